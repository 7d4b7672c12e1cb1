//! What a node does about its assignments: a pure diff between what the
//! managers assign and what runs here.

use std::collections::BTreeSet;

use crate::api::service::{Assignment, DesiredState, TaskReport, TaskState};

/// One step of a node's reconciliation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Prepare and start this task.
    Start(Assignment),
    /// Stop this running task (SIGTERM, then SIGKILL after its grace period).
    Stop(u64),
    /// Tell the managers about a task this node does not run.
    Report(TaskReport),
    /// Delete what is left of a task that is no longer the node's (its
    /// directory and logs).
    Forget(u64),
    /// Watch again a task whose process a previous agent started and left
    /// running (an agent restart interrupts no task).
    Adopt(Assignment),
    /// Kill a process a previous agent left for a task that is no longer
    /// assigned here.
    Reap(u64),
}

/// What the node has.
#[derive(Clone, Debug, Default)]
pub(crate) struct Local {
    /// Tasks whose process this agent started and still watches.
    pub(crate) running: BTreeSet<u64>,
    /// Tasks this agent already reported as ended (their reports may not
    /// have reached the store yet).
    pub(crate) ended: BTreeSet<u64>,
    /// Task directories on disk.
    pub(crate) dirs: BTreeSet<u64>,
    /// Tasks whose process a previous agent left alive (known only until
    /// the first reconciliation after a restart).
    pub(crate) leftovers: BTreeSet<u64>,
}

/// Diffs the managers' view of this node's tasks against the node's own.
/// `retained` are ended tasks the store still lists (their logs stay).
pub(crate) fn reconcile(assigned: &[Assignment], retained: &[u64], local: &Local) -> Vec<Action> {
    let mut actions = Vec::new();
    let mut known: BTreeSet<u64> = retained.iter().copied().collect();
    for a in assigned {
        known.insert(a.task);
        let mut here = local.running.contains(&a.task);
        if !here && local.leftovers.contains(&a.task) {
            // Adopted whatever its desired state; a stop follows if wanted.
            actions.push(Action::Adopt(a.clone()));
            here = true;
        }
        let ended = local.ended.contains(&a.task);
        match (a.desired, here, ended) {
            (DesiredState::Shutdown, true, _) => actions.push(Action::Stop(a.task)),
            (DesiredState::Running, true, _) | (_, false, true) => {}
            (DesiredState::Running, false, false) if a.state <= TaskState::Assigned => {
                actions.push(Action::Start(a.clone()))
            }
            (DesiredState::Running, false, false) => actions.push(Action::Report(TaskReport {
                task: a.task,
                state: TaskState::Failed,
                message: "the task's process is gone (its agent restarted)".into(),
            })),
            (DesiredState::Shutdown, false, false) => actions.push(Action::Report(TaskReport {
                task: a.task,
                state: TaskState::Shutdown,
                message: if a.state <= TaskState::Assigned {
                    "stopped before it started".into()
                } else {
                    "the task's process is gone (its agent restarted)".into()
                },
            })),
        }
    }
    actions.extend(
        local
            .leftovers
            .iter()
            .filter(|id| !known.contains(id) && !local.running.contains(id))
            .map(|id| Action::Reap(*id)),
    );
    // Running here but no longer assigned at all (its service was removed
    // and its record pruned, or the node was removed).
    actions.extend(
        local
            .running
            .iter()
            .filter(|id| !known.contains(id))
            .map(|id| Action::Stop(*id)),
    );
    actions.extend(
        local
            .dirs
            .iter()
            .filter(|id| !known.contains(id) && !local.running.contains(id))
            .map(|id| Action::Forget(*id)),
    );
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::service::TaskSpec;

    fn assigned(task: u64, desired: DesiredState, state: TaskState) -> Assignment {
        Assignment {
            task,
            service: 1,
            desired,
            state,
            spec: TaskSpec::default(),
            endpoints_pending: 0,
        }
    }

    #[test]
    fn starts_new_tasks_and_stops_unwanted_ones() {
        let local = Local {
            running: [2, 3, 9].into(),
            ..Local::default()
        };
        let actions = reconcile(
            &[
                assigned(1, DesiredState::Running, TaskState::Assigned),
                assigned(2, DesiredState::Running, TaskState::Running),
                assigned(3, DesiredState::Shutdown, TaskState::Running),
            ],
            &[],
            &local,
        );
        assert_eq!(actions.len(), 3, "{actions:?}");
        assert!(matches!(&actions[0], Action::Start(a) if a.task == 1));
        assert_eq!(actions[1], Action::Stop(3));
        assert_eq!(actions[2], Action::Stop(9), "no longer assigned at all");
    }

    #[test]
    fn reports_tasks_it_cannot_have() {
        let actions = reconcile(
            &[
                assigned(1, DesiredState::Running, TaskState::Running),
                assigned(2, DesiredState::Shutdown, TaskState::Assigned),
                assigned(3, DesiredState::Running, TaskState::Running),
            ],
            &[],
            &Local {
                ended: [3].into(),
                ..Local::default()
            },
        );
        assert_eq!(
            actions,
            vec![
                Action::Report(TaskReport {
                    task: 1,
                    state: TaskState::Failed,
                    message: "the task's process is gone (its agent restarted)".into()
                }),
                Action::Report(TaskReport {
                    task: 2,
                    state: TaskState::Shutdown,
                    message: "stopped before it started".into()
                }),
            ],
            "task 3 ended here and its report is on its way"
        );
    }

    #[test]
    fn adopts_what_a_previous_agent_left_and_reaps_the_unassigned() {
        let local = Local {
            leftovers: [1, 2, 7].into(),
            dirs: [1, 2, 7].into(),
            ..Local::default()
        };
        let actions = reconcile(
            &[
                assigned(1, DesiredState::Running, TaskState::Running),
                assigned(2, DesiredState::Shutdown, TaskState::Running),
            ],
            &[],
            &local,
        );
        assert!(matches!(&actions[0], Action::Adopt(a) if a.task == 1));
        assert!(matches!(&actions[1], Action::Adopt(a) if a.task == 2));
        assert_eq!(actions[2], Action::Stop(2), "adopted, then stopped as wanted");
        assert_eq!(actions[3..], [Action::Reap(7), Action::Forget(7)]);
    }

    #[test]
    fn forgets_directories_of_tasks_the_store_dropped() {
        let local = Local {
            dirs: [1, 2, 3].into(),
            running: [3].into(),
            ..Local::default()
        };
        let actions = reconcile(&[], &[2], &local);
        assert_eq!(actions, vec![Action::Stop(3), Action::Forget(1)]);
    }
}
