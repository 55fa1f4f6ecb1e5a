//! What sends messages to workers besides the pipeline itself, and what
//! catches the ones that fail: `worker invoke` and HTTP invocations
//! ([`invoke`]), cron schedules ([`cron`]: the rules, pure; [`firing`]: the
//! daemon's loop), and the dead letters ([`dead_letters`]). All of them
//! speak to the broker through one client ([`amqp`]: connect, declare,
//! publish with confirms).

pub mod amqp;
pub mod cron;
pub mod dead_letters;
pub mod firing;
pub mod invoke;
