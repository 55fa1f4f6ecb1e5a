//! Worker containers as part of the Compose project the daemon runs in, so
//! that `docker compose down` takes them down with the stack.
//!
//! Compose finds a project's containers by their labels. Besides the
//! containers of its services it knows *one-off* containers (those of
//! `docker compose run`): `com.docker.compose.project=<p>`,
//! `com.docker.compose.service=<s>` and `com.docker.compose.oneoff=True`.
//! `down` stops and removes them with the services' containers — Compose v1
//! always, Compose v2 before 2.10 always, Compose v2 from 2.10 on with
//! `--remove-orphans` — after which the project's network has no endpoint
//! left and is removed too. `up`, `restart`, `stop` and `start` leave
//! one-offs alone (v1: `Project::containers` excludes them by default;
//! v2: `oneOffExclude`), and `up` does not take them for orphans. So a
//! worker container labelled as a one-off of the daemon's own service
//! lives as long as the stack, and nothing else of Compose touches it.
//!
//! The daemon learns its project and service from its own container's
//! labels: its container id is read from `/proc/self/mountinfo` (Docker
//! bind-mounts `/var/lib/docker/containers/<id>/hostname` and friends into
//! every container), else taken from `HOSTNAME` (a container's default
//! hostname is its short id). Outside Compose (no such container, or one
//! without the labels) workers get no Compose label at all.
//!
//! The labels are not part of a container's spec hash: a restarted daemon
//! finds its containers unchanged (a container made before this existed
//! keeps running without them until its next replacement).
//!
//! Decides nothing else; the only I/O is the one inspect of the daemon's
//! own container, at start.

use std::collections::BTreeMap;

use bollard::Docker;

/// Compose's label keys (the same in v1 and v2).
pub(crate) const PROJECT: &str = "com.docker.compose.project";
pub(crate) const SERVICE: &str = "com.docker.compose.service";
pub(crate) const ONE_OFF: &str = "com.docker.compose.oneoff";
/// The project's working directory and files: `docker compose` v2 reads
/// them to show where a project comes from; copied when present.
const PASSED_ON: [&str; 3] = [
    "com.docker.compose.project.working_dir",
    "com.docker.compose.project.config_files",
    "com.docker.compose.version",
];

/// The container id in a `/proc/self/mountinfo`: the 64-hex-digit path
/// element after `/containers/` in a mount Docker made for the container
/// (`/etc/hostname`, `/etc/hosts`, `/etc/resolv.conf`).
pub(crate) fn container_id_in_mountinfo(mountinfo: &str) -> Option<String> {
    mountinfo.lines().find_map(|line| {
        let (_, rest) = line.split_once("/containers/")?;
        let id: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
        let follows = rest[id.len()..].starts_with('/');
        (id.len() == 64 && follows).then_some(id)
    })
}

/// The labels that make a worker container a one-off of the service whose
/// container carries `own`; `None` when `own` is not a Compose container's.
pub(crate) fn one_off_labels(own: &BTreeMap<String, String>) -> Option<BTreeMap<String, String>> {
    let project = own.get(PROJECT).filter(|p| !p.is_empty())?;
    let service = own.get(SERVICE).filter(|s| !s.is_empty())?;
    let mut labels = BTreeMap::from([
        (PROJECT.to_string(), project.clone()),
        (SERVICE.to_string(), service.clone()),
        (ONE_OFF.to_string(), "True".to_string()),
    ]);
    for key in PASSED_ON {
        if let Some(value) = own.get(key) {
            labels.insert(key.to_string(), value.clone());
        }
    }
    Some(labels)
}

/// The one-off labels for workers of a daemon running in a Compose
/// container, or `None` (not in a container, not Compose's, or the engine
/// could not tell).
pub(crate) async fn detect(docker: &Docker) -> Option<BTreeMap<String, String>> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let candidates = container_id_in_mountinfo(&mountinfo)
        .into_iter()
        .chain(std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()));
    for id in candidates {
        let Ok(own) = docker.inspect_container(&id, None).await else {
            continue;
        };
        let labels = own.config.and_then(|c| c.labels).unwrap_or_default();
        return one_off_labels(&labels.into_iter().collect());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4e5d6c7b8a99887766554433221100ffeeddccbbaa00112233445566778899";

    #[test]
    fn the_container_id_is_read_from_dockers_mounts() {
        let cases: [(&str, Option<&str>); 4] = [
            (
                "1234 1200 254:1 /var/lib/docker/containers/3f4e5d6c7b8a99887766554433221100ffeeddccbbaa00112233445566778899/hostname /etc/hostname rw - ext4 /dev/vda1 rw",
                Some(ID),
            ),
            (
                "22 1 0:21 / /proc rw - proc proc rw\n\
                 1235 1200 254:1 /docker/containers/3f4e5d6c7b8a99887766554433221100ffeeddccbbaa00112233445566778899/resolv.conf /etc/resolv.conf rw - ext4 /dev/vda1 rw",
                Some(ID),
            ),
            ("22 1 0:21 / /proc rw - proc proc rw", None),
            (
                "1 1 0:1 /srv/containers/abc/hostname /etc/hostname rw - ext4 x rw",
                None,
            ),
        ];
        for (mountinfo, want) in cases {
            assert_eq!(
                container_id_in_mountinfo(mountinfo).as_deref(),
                want,
                "{mountinfo}"
            );
        }
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_compose_container_makes_its_workers_one_offs_of_its_service() {
        let own = map(&[
            (PROJECT, "workerctl"),
            (SERVICE, "workerctl"),
            (ONE_OFF, "False"),
            ("com.docker.compose.container-number", "1"),
            ("com.docker.compose.config-hash", "abc"),
            ("com.docker.compose.project.working_dir", "/src/workerctl"),
        ]);
        let want = map(&[
            (PROJECT, "workerctl"),
            (SERVICE, "workerctl"),
            (ONE_OFF, "True"),
            ("com.docker.compose.project.working_dir", "/src/workerctl"),
        ]);
        assert_eq!(one_off_labels(&own), Some(want));
    }

    #[test]
    fn a_container_without_a_project_and_service_gets_no_compose_label() {
        for own in [
            map(&[]),
            map(&[(PROJECT, "p")]),
            map(&[(SERVICE, "s")]),
            map(&[(PROJECT, ""), (SERVICE, "s")]),
        ] {
            assert_eq!(one_off_labels(&own), None, "{own:?}");
        }
    }
}
