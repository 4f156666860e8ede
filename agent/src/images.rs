//! The installed-image report for the manager: which kernel images this node holds, written
//! after every heartbeat to `installed_image:{agent_id}` in Redis' image database
//! (`redis.image-db`, Backend.AI: 3) as a JSON list of `{canonical, digest, architecture}`, as
//! Backend.AI's agent writes it (`ValkeyImageClient.add_agent_installed_images`). The manager
//! reads it with each heartbeat to record which agents have which image.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::{
    docker::DockerClient,
    events::{RedisLink, RedisTarget},
};

/// The key of an agent's report.
pub fn report_key(agent_id: &str) -> String {
    format!("installed_image:{agent_id}")
}

/// Scans the engine's kernel images and writes the report every `interval` until `stop`.
/// An engine or Redis that cannot be reached is said once per outage; the next round retries.
pub async fn run_report(
    docker_host: Option<String>,
    agent_id: String,
    target: RedisTarget,
    interval: Duration,
    stop: CancellationToken,
) {
    let client = match target.client() {
        Ok(client) => client,
        Err(err) => {
            return tracing::error!(redis = %target.addr, %err, "cannot set up the Redis client for the image report");
        }
    };
    let mut link = RedisLink::new(client);
    let mut docker = None;
    let mut architectures = std::collections::HashMap::new();
    let mut ticks = crate::clock::Clock::new(interval);
    let mut failing = false;
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            _ = ticks.tick() => {}
        }
        match report_once(docker_host.as_deref(), &agent_id, &mut docker, &mut architectures, &mut link).await {
            Ok(count) => {
                if std::mem::take(&mut failing) {
                    tracing::info!(images = count, "the installed-image report is written again");
                }
            }
            Err(err) if !failing => {
                failing = true;
                tracing::warn!(error = %err, "cannot write the installed-image report; retrying every heartbeat");
            }
            Err(_) => {}
        }
    }
}

/// One scan and write; the number of images reported. The engine client is made on first use
/// and dropped on an error (the next round reconnects).
async fn report_once(
    docker_host: Option<&str>,
    agent_id: &str,
    docker: &mut Option<DockerClient>,
    architectures: &mut std::collections::HashMap<String, String>,
    link: &mut RedisLink,
) -> Result<usize, String> {
    let client = match docker {
        Some(client) => client,
        None => docker.insert(DockerClient::connect(docker_host, agent_id).await.map_err(|err| err.to_string())?),
    };
    let images = match client.kernel_images(architectures).await {
        Ok(images) => images,
        Err(err) => {
            *docker = None;
            return Err(err.to_string());
        }
    };
    if images.is_empty() {
        // Backend.AI's agent writes nothing then either.
        return Ok(0);
    }
    let value = serde_json::to_string(&images).map_err(|err| err.to_string())?;
    let mut pipe = redis::pipe();
    pipe.cmd("SET").arg(report_key(agent_id)).arg(value).ignore();
    link.run(&pipe).await.map_err(|err| format!("Redis: {err}"))?;
    Ok(images.len())
}
