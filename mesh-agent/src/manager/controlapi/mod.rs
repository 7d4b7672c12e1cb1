//! The cluster API as the leader serves it: `handle_cluster` dispatches
//! each request to its resource's handler, which checks it (`rules`) and
//! proposes the commands that carry it out.

mod blobs;
mod certificates;
mod networks;
mod nodes;
mod services;
mod swarm;
