//! Why a container exited, in words: what its exit code means, and the line
//! of its last output that explains it. Pure: the reconciler reads the lines
//! (one Docker call per exited container) and the planner puts the words in
//! the worker's status, so that a person reading the dashboard sees
//! "SyntaxError: invalid syntax (usercode.py, line 3)" rather than a number.
//!
//! The dockerworker's own exit codes are known (when a container carries
//! the `workerctl.runtime=dockerworker` label its image sets); any other
//! image's code is just a number, but for the signal deaths.
//!
//! The dockerworker logs one JSON object per line, and says why it gives up
//! in a line with `"level": "error"`, an `event` and an `error`. Any other
//! image is read as plain text: its last line that is not blank (a Python
//! traceback ends with the exception, a shell with its complaint).

/// How many of an exited container's last lines are read to explain it.
pub(crate) const LINES_READ: usize = 20;

/// The longest explanation kept: a status is one sentence, not a log.
const MAX_CHARS: usize = 300;

/// The exit code with its meaning when it has a well-known one: the
/// dockerworker's own codes (its README lists them) when the container runs
/// it, and the signal deaths any container can have.
pub(crate) fn code_text(code: Option<i64>, dockerworker: bool) -> String {
    let Some(code) = code else {
        return "unknown".into();
    };
    let own = if dockerworker {
        dockerworker_meaning(code)
    } else {
        None
    };
    let meaning = own.or(match code {
        137 => Some("killed: out of memory, or SIGKILL"),
        139 => Some("segmentation fault"),
        143 => Some("terminated by SIGTERM"),
        _ => None,
    });
    match meaning {
        Some(meaning) => format!("{code} ({meaning})"),
        None => code.to_string(),
    }
}

/// The dockerworker's exit codes (dockerworker/README.md, "Exit codes").
fn dockerworker_meaning(code: i64) -> Option<&'static str> {
    Some(match code {
        0 => "clean shutdown",
        1 => "internal error",
        2 => "configuration error",
        3 => "code download failed",
        4 => "code invalid",
        5 => "queue declaration refused",
        6 => "process() did not return in time",
        _ => return None,
    })
}

/// Whether restarting the container cannot help until the worker's code
/// changes: the dockerworker found the code invalid (exit code 4).
pub(crate) fn waits_for_fix(code: Option<i64>, dockerworker: bool) -> bool {
    dockerworker && code == Some(4)
}

/// The one line of `lines` (oldest first) that best says why the container
/// exited: the last error the dockerworker logged, else the last line that is
/// not blank and not a structured log line of a lower level.
pub(crate) fn explain(lines: &[String]) -> Option<String> {
    let mut plain = None;
    for line in lines.iter().rev().map(|l| l.trim()) {
        if line.is_empty() {
            continue;
        }
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(serde_json::Value::Object(fields)) => {
                if let Some(words) = logged_error(&fields) {
                    return Some(clip(&words));
                }
            }
            _ => {
                if plain.is_none() {
                    plain = Some(line);
                }
            }
        }
    }
    plain.map(clip)
}

/// `event: error` of a structured line logged at level error or above.
fn logged_error(fields: &serde_json::Map<String, serde_json::Value>) -> Option<String> {
    let level = fields.get("level")?.as_str()?.to_ascii_lowercase();
    if !matches!(level.as_str(), "error" | "critical" | "fatal") {
        return None;
    }
    let text = |key: &str| fields.get(key).and_then(|v| v.as_str()).map(str::trim);
    let event = text("event").filter(|e| !e.is_empty());
    let detail = text("error")
        .map(first_and_last_line)
        .or_else(|| text("exception").and_then(|e| e.lines().last().map(str::to_string)))
        .filter(|d| !d.is_empty());
    match (event, detail) {
        (Some(event), Some(detail)) => Some(format!("{event}: {detail}")),
        (Some(event), None) => Some(event.to_string()),
        (None, Some(detail)) => Some(detail),
        (None, None) => None,
    }
}

/// A traceback in one line: what failed (its first line) and the exception
/// (its last), which is what a person needs; the frames are in the logs.
fn first_and_last_line(text: &str) -> String {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    match (lines.next(), lines.next_back()) {
        (Some(first), Some(last)) => format!("{first} … {last}"),
        (Some(only), None) => only.to_string(),
        (None, _) => String::new(),
    }
}

fn clip(text: &str) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(MAX_CHARS) {
        Some((cut, _)) => format!("{}…", &one_line[..cut]),
        None => one_line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_string).collect()
    }

    #[test]
    fn the_dockerworkers_last_error_is_the_explanation() {
        let output = lines(
            r#"{"ts":"t","level":"info","event":"starting","worker_id":"w"}
{"ts":"t","level":"error","event":"code_invalid","error":"usercode.py, line 3: invalid syntax"}
{"ts":"t","level":"info","event":"stopped"}
"#,
        );
        assert_eq!(
            explain(&output).as_deref(),
            Some("code_invalid: usercode.py, line 3: invalid syntax")
        );
    }

    #[test]
    fn a_logged_exception_gives_its_last_line() {
        let output = lines(
            r#"{"level":"error","event":"internal_error","exception":"Traceback (most recent call last):\n  File \"x\"\nRuntimeError: boom"}"#,
        );
        assert_eq!(
            explain(&output).as_deref(),
            Some("internal_error: RuntimeError: boom")
        );
    }

    #[test]
    fn a_multi_line_error_keeps_what_failed_and_the_exception() {
        let output = lines(
            r#"{"level":"error","event":"code_invalid","error":"importing 'usercode' failed:\nTraceback (most recent call last):\n  File \"usercode.py\", line 1\nNameError: name 'x' is not defined\n"}"#,
        );
        assert_eq!(
            explain(&output).as_deref(),
            Some("code_invalid: importing 'usercode' failed: … NameError: name 'x' is not defined")
        );
    }

    #[test]
    fn plain_output_gives_its_last_line_that_is_not_blank() {
        let output =
            lines("Traceback (most recent call last):\n  File \"main.py\"\nValueError: bad\n\n");
        assert_eq!(explain(&output).as_deref(), Some("ValueError: bad"));
    }

    #[test]
    fn info_lines_alone_explain_nothing_and_silence_is_none() {
        let output = lines(r#"{"level":"info","event":"stopped"}"#);
        assert_eq!(explain(&output), None);
        assert_eq!(explain(&[]), None);
    }

    #[test]
    fn a_long_line_is_clipped_to_one_sentence() {
        let long = "é".repeat(1000);
        let words = explain(&[long]).expect("a line");
        assert_eq!(words.chars().count(), MAX_CHARS + 1);
        assert!(words.ends_with('…'));
    }

    #[test]
    fn exit_codes_say_what_they_mean() {
        let cases = [
            (Some(3), false, "3"),
            (Some(3), true, "3 (code download failed)"),
            (Some(4), true, "4 (code invalid)"),
            (Some(5), true, "5 (queue declaration refused)"),
            (Some(6), true, "6 (process() did not return in time)"),
            (Some(137), false, "137 (killed: out of memory, or SIGKILL)"),
            (Some(137), true, "137 (killed: out of memory, or SIGKILL)"),
            (Some(143), false, "143 (terminated by SIGTERM)"),
            (None, true, "unknown"),
        ];
        for (code, dockerworker, text) in cases {
            assert_eq!(
                code_text(code, dockerworker),
                text,
                "{code:?} {dockerworker}"
            );
        }
    }

    #[test]
    fn only_the_dockerworkers_invalid_code_waits_for_a_fix() {
        assert!(waits_for_fix(Some(4), true));
        assert!(
            !waits_for_fix(Some(4), false),
            "another image's 4 means nothing known"
        );
        assert!(
            !waits_for_fix(Some(3), true),
            "a download may work next time"
        );
        assert!(!waits_for_fix(None, true));
    }
}
