//! The `workerctl` binary: parse the command line, load the configuration,
//! wire the parts together and run.

fn main() {}
