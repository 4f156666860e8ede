//! Background tasks as Backend.AI's manager follows them: a long call (`commit`,
//! `push_image`) answers at once with a task id, and the work's progress and outcome arrive as
//! `bgtask_updated` / `bgtask_done` / `bgtask_failed` events (26.9 broadcasts them, each cached
//! under `bgtask.<task id>`, see [`super::wire`]), which the manager waits on.

use std::future::Future;

use rmpv::Value;

use super::EventBus;

/// Starts `work` in the background under a new task id (a UUID, as Backend.AI's
/// `BackgroundTaskManager` makes them) and returns the id. `bgtask_updated` ("Task started")
/// is emitted before this returns, so it precedes anything the task reports; when `work`
/// ends, `bgtask_done` with its message or `bgtask_failed` with its error follows.
pub fn start<F>(events: &EventBus, name: &'static str, work: F) -> String
where
    F: Future<Output = Result<Option<String>, String>> + Send + 'static,
{
    let task_id = uuid::Uuid::new_v4().to_string();
    events.emit("bgtask_updated", vec![task_id.as_str().into(), 0.0.into(), 0.0.into(), "Task started".into()]);
    let (events, id) = (events.clone(), task_id.clone());
    tokio::spawn(async move {
        match work.await {
            Ok(message) => {
                tracing::info!(task = name, task_id = %id, "background task done");
                events.emit("bgtask_done", vec![id.into(), message.map_or(Value::Nil, Value::from)]);
            }
            Err(error) => {
                tracing::warn!(task = name, task_id = %id, %error, "background task failed");
                events.emit("bgtask_failed", vec![id.into(), error.into()]);
            }
        }
    });
    task_id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_reports_its_start_then_its_outcome_under_its_id() {
        let (bus, mut rx) = EventBus::capture();
        let done = start(&bus, "ok", async { Ok(Some("committed".to_owned())) });
        let failed = start(&bus, "bad", async { Err("the container is gone".to_owned()) });
        assert_ne!(done, failed);
        assert!(uuid::Uuid::parse_str(&done).is_ok(), "{done}");
        let mut seen = Vec::new();
        while seen.len() < 4 {
            let event = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
                .await
                .expect("events arrive")
                .expect("bus open");
            seen.push((event.name, event.args));
        }
        let of = |id: &str| seen.iter().filter(|(_, args)| args[0].as_str() == Some(id)).collect::<Vec<_>>();
        let done_events = of(&done);
        assert_eq!(done_events[0].0, "bgtask_updated");
        assert_eq!((done_events[1].0.as_str(), done_events[1].1[1].as_str()), ("bgtask_done", Some("committed")));
        let failed_events = of(&failed);
        assert_eq!(failed_events[0].0, "bgtask_updated");
        assert_eq!(
            (failed_events[1].0.as_str(), failed_events[1].1[1].as_str()),
            ("bgtask_failed", Some("the container is gone"))
        );
    }
}
