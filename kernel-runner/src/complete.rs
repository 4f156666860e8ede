//! `complete`: completion candidates for the text before the cursor. Python asks the running
//! interpreter (`rlcompleter` over its globals); the shell profile completes command names
//! from `PATH` and the shell's builtins, and file names under the work dir.

use std::{collections::BTreeSet, path::Path};

/// Most candidates one reply carries.
pub const MAX_CANDIDATES: usize = 200;

/// The text to complete from a `complete` payload: JSON `{"code": …}` (or `"line"`), else
/// the payload itself as text.
pub fn request_text(payload: &[u8]) -> String {
    match serde_json::from_slice::<serde_json::Value>(payload) {
        Ok(serde_json::Value::Object(map)) => ["code", "line", "text"]
            .iter()
            .find_map(|key| map.get(*key).and_then(|v| v.as_str()))
            .unwrap_or_default()
            .to_owned(),
        Ok(serde_json::Value::String(text)) => text,
        _ => String::from_utf8_lossy(payload).into_owned(),
    }
}

const SHELL_BUILTINS: &[&str] = &[
    "alias", "break", "cd", "command", "continue", "echo", "eval", "exec", "exit", "export", "false", "getopts",
    "hash", "kill", "printf", "pwd", "read", "readonly", "return", "set", "shift", "test", "times", "trap", "true",
    "type", "ulimit", "umask", "unalias", "unset", "wait",
];

/// Candidates for the last word of `text` in a POSIX shell: the whole word each time.
pub fn shell(text: &str, work_dir: &Path, path_var: &str) -> Vec<String> {
    let word_start = text.rfind(|c: char| c.is_whitespace() || matches!(c, ';' | '|' | '&' | '(')).map_or(0, |i| i + 1);
    let word = &text[word_start..];
    let first_word =
        text[..word_start].trim_end().is_empty() || text[..word_start].trim_end().ends_with([';', '|', '&', '(']);
    let mut found = BTreeSet::new();
    if first_word && !word.contains('/') {
        found.extend(SHELL_BUILTINS.iter().filter(|b| b.starts_with(word)).map(|b| (*b).to_owned()));
        for dir in path_var.split(':').filter(|d| !d.is_empty()) {
            for name in entries(Path::new(dir)) {
                if name.starts_with(word) {
                    found.insert(name);
                }
            }
        }
    } else {
        let (dir_part, prefix) = match word.rfind('/') {
            Some(i) => (&word[..=i], &word[i + 1..]),
            None => ("", word),
        };
        let dir = if dir_part.starts_with('/') { Path::new(dir_part).to_path_buf() } else { work_dir.join(dir_part) };
        for name in entries(&dir) {
            if name.starts_with(prefix) && (!name.starts_with('.') || prefix.starts_with('.')) {
                let slash = if dir.join(&name).is_dir() { "/" } else { "" };
                found.insert(format!("{dir_part}{name}{slash}"));
            }
        }
    }
    found.into_iter().take(MAX_CANDIDATES).collect()
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_completes_commands_then_files() {
        let dir = std::env::temp_dir().join(format!("krunner-complete-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("data/inner")).ok();
        std::fs::write(dir.join("data/report.txt"), "x").ok();
        std::fs::write(dir.join("main.sh"), "x").ok();
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).ok();
        std::fs::write(bin.join("mytool"), "x").ok();
        let path = bin.to_string_lossy().into_owned();
        assert_eq!(shell("myt", &dir, &path), vec!["mytool"]);
        assert!(shell("ec", &dir, &path).contains(&"echo".to_owned()));
        assert_eq!(shell("cat ma", &dir, &path), vec!["main.sh"]);
        assert_eq!(shell("ls data/", &dir, &path), vec!["data/inner/", "data/report.txt"]);
        assert_eq!(shell("echo x; myt", &dir, &path), vec!["mytool"]);
        assert!(shell("cat zz", &dir, &path).is_empty());
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(request_text(br#"{"code": "pri", "row": 0}"#), "pri");
        assert_eq!(request_text(b"plain"), "plain");
    }
}
