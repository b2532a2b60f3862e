//! Process-level tests: real `obnam-node` processes driven by the real `obnam` client.
//! One integration binary (ripgrep style); modules by topic.

mod util;

mod audits;
mod errors;
mod faults;
mod friends;
mod nat;
mod one_node;
mod recovery;
mod rotation;
mod strangers;
