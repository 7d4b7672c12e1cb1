//! Task runtime: the namespaces tasks run in.

pub mod netns;
