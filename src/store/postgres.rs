//! Postgres implementation of [`super::WorkerStore`] (sqlx), the embedded
//! migrations, and the LISTEN/NOTIFY wake-up source.
