//! The SensorBucket code archive (docs/compatibility.md §2): building it from a user's
//! `process` code, as the dashboard's API does, so that workers created from
//! the command line are indistinguishable from the dashboard's.

use std::io::{Cursor, Write};

use zip::ZipWriter;
use zip::write::SimpleFileOptions;

/// The code of a new worker, as the dashboard creates it.
pub const DEFAULT_USERCODE: &str = "def process(msg):\n    return msg\n";

/// The platform wrapper the existing API ships beside the user's code.
const MAIN_PY: &str = "\
# Platform wrapper: imports the user's code. Runtimes may call
# usercode.process directly instead.
import usercode


def main(message):
    return usercode.process(message)
";

const REQUIREMENTS_TXT: &str = "python-dateutil==2.8.2\n";

const BUILD_SH: &str = "#!/bin/sh\npip3 install -r ${SRC_PKG}/requirements.txt -t ${SRC_PKG} && cp -r ${SRC_PKG} ${DEPLOY_PKG}\n";

/// A zip with `usercode.py`, `main.py`, `requirements.txt` and `build.sh`.
pub fn sensorbucket_archive(usercode: &str) -> Result<Vec<u8>, zip::result::ZipError> {
    let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default();
    for (name, body) in [
        ("usercode.py", usercode),
        ("main.py", MAIN_PY),
        ("requirements.txt", REQUIREMENTS_TXT),
        ("build.sh", BUILD_SH),
    ] {
        zip.start_file(name, options)?;
        zip.write_all(body.as_bytes())?;
    }
    Ok(zip.finish()?.into_inner())
}

#[cfg(test)]
mod tests {
    /// Whether `bytes` is a readable zip archive.
    fn is_zip(bytes: &[u8]) -> bool {
        zip::ZipArchive::new(std::io::Cursor::new(bytes)).is_ok()
    }

    use super::*;
    use std::io::Read;

    #[test]
    fn archive_has_the_sensorbucket_layout() {
        let bytes = sensorbucket_archive(DEFAULT_USERCODE).expect("builds");
        let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).expect("is a zip");
        let mut names: Vec<String> = zip
            .file_names()
            .map(|n| n.expect("utf-8 name").into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["build.sh", "main.py", "requirements.txt", "usercode.py"]
        );
        let mut code = String::new();
        zip.by_name("usercode.py")
            .expect("usercode")
            .read_to_string(&mut code)
            .expect("utf-8");
        assert_eq!(code, DEFAULT_USERCODE);
    }

    #[test]
    fn garbage_is_not_a_zip() {
        assert!(!is_zip(b"PK\x03\x04 but not really"));
        assert!(is_zip(&sensorbucket_archive("x = 1").expect("builds")));
    }
}
