//! Docker implementation of [`super::ContainerRuntime`] (bollard), and the
//! Docker events wake-up source.
