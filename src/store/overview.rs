//! The read model people look at: every worker with what workerctl last
//! observed of its container. Shared by `workerctl worker list/show` and the
//! status page; the reconciler never reads it.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::StoreError;
use crate::model::{Status, WorkerState};

/// One worker as a person sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct WorkerOverview {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    #[sqlx(try_from = "String")]
    pub state: WorkerState,
    pub language: String,
    /// The revision the store wants.
    pub revision: i32,
    #[sqlx(try_from = "String")]
    pub status: Status,
    pub status_info: String,
    pub entrypoint: String,
    /// The revision of the container that runs, if one runs.
    pub running_revision: Option<i32>,
    pub container: Option<String>,
    pub container_state: Option<String>,
    pub restarts: i32,
    pub last_exit_code: Option<i64>,
    /// When the observation last changed.
    pub observed_at: Option<DateTime<Utc>>,
    /// Replica bounds (`workerctl worker scale`; 1, 1, 20 when never set).
    pub min_replicas: i32,
    pub max_replicas: i32,
    pub per_replica: i32,
    /// Replicas the last pass wanted, and those with a running container.
    pub desired_replicas: i32,
    pub running_replicas: i32,
}

const SELECT: &str = "
    SELECT w.id,
           COALESCE(w.name, '') AS name,
           COALESCE(w.description, '') AS description,
           COALESCE(w.state::text, '') AS state,
           COALESCE(w.language, '') AS language,
           COALESCE(w.revision, 0) AS revision,
           COALESCE(w.status::text, '') AS status,
           COALESCE(w.status_info, '') AS status_info,
           COALESCE(w.entrypoint, '') AS entrypoint,
           o.running_revision,
           o.container,
           o.container_state,
           COALESCE(o.restarts, 0) AS restarts,
           o.last_exit_code,
           o.updated_at AS observed_at,
           COALESCE(s.min_replicas, 1) AS min_replicas,
           COALESCE(s.max_replicas, 1) AS max_replicas,
           COALESCE(s.per_replica, 20) AS per_replica,
           COALESCE(o.desired_replicas,
                    CASE WHEN w.state = 'enabled' THEN 1 ELSE 0 END) AS desired_replicas,
           COALESCE(o.running_replicas, 0) AS running_replicas
      FROM user_workers w
      LEFT JOIN workerctl_observed o ON o.worker_id = w.id
      LEFT JOIN workerctl_worker_scale s ON s.worker_id = w.id";

/// Every worker, by name then id.
pub async fn list(pool: &PgPool) -> Result<Vec<WorkerOverview>, StoreError> {
    let sql = format!("{SELECT} ORDER BY name, w.id");
    sqlx::query_as(&sql)
        .fetch_all(pool)
        .await
        .map_err(|source| StoreError::Query {
            what: "list workers",
            source,
        })
}

/// One worker by id.
pub async fn get(pool: &PgPool, id: Uuid) -> Result<Option<WorkerOverview>, StoreError> {
    let sql = format!("{SELECT} WHERE w.id = $1");
    sqlx::query_as(&sql)
        .bind(id)
        .fetch_optional(pool)
        .await
        .map_err(|source| StoreError::Query {
            what: "load worker",
            source,
        })
}
