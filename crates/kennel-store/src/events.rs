//! Which event each change records, and what the event says, for every backend: a backend
//! stores a [`NewEvent`] in the transaction of its change and hands back the stored
//! [`Event`]. What an event contains must not depend on the backend, since SSE clients and
//! the other coordinators read it.

use kennel_proto::api::{Event, Task};

use crate::{rfc3339, DaemonHello, Millis};

/// An event to store; its id comes from the backend.
#[derive(Debug, Clone)]
pub(crate) struct NewEvent {
    pub kind: String,
    pub task_id: Option<String>,
    pub daemon_id: Option<String>,
    pub data: serde_json::Value,
}

impl NewEvent {
    pub fn new(
        kind: &str,
        task_id: Option<&str>,
        daemon_id: Option<&str>,
        data: serde_json::Value,
    ) -> NewEvent {
        NewEvent {
            kind: kind.to_string(),
            task_id: task_id.map(str::to_string),
            daemon_id: daemon_id.map(str::to_string),
            data,
        }
    }

    /// `task.created`: a task was submitted.
    pub fn task_created(task: &Task) -> NewEvent {
        let data = serde_json::json!({
            "status": task.status,
            "name": task.name,
            "priority": task.priority,
        });
        NewEvent::new("task.created", Some(&task.id), None, data)
    }

    /// `task.status`: what every change of a task's state records, with the task after it.
    pub fn task_status(task: &Task) -> NewEvent {
        let data = serde_json::json!({
            "status": task.status,
            "attempt": task.attempt,
            "daemonId": task.daemon_id,
            "error": task.error,
            "exitCode": task.exit_code,
            "branch": task.branch,
            "commit": task.commit,
        });
        NewEvent::new(
            "task.status",
            Some(&task.id),
            task.daemon_id.as_deref(),
            data,
        )
    }

    /// `daemon.connected`: a daemon's link was accepted.
    pub fn daemon_connected(daemon_id: &str, hello: &DaemonHello) -> NewEvent {
        let data = serde_json::json!({
            "hostname": hello.hostname,
            "machineId": hello.machine_id,
            "maxConcurrentTasks": hello.max_concurrent_tasks,
            "agents": hello.agents,
        });
        NewEvent::new("daemon.connected", None, Some(daemon_id), data)
    }

    /// `daemon.disconnected`: a daemon's link ended, for `reason`.
    pub fn daemon_disconnected(daemon_id: &str, reason: &str) -> NewEvent {
        let data = serde_json::json!({ "reason": reason });
        NewEvent::new("daemon.disconnected", None, Some(daemon_id), data)
    }

    /// `daemon.draining`: a daemon stopped (or resumed) taking new work.
    pub fn daemon_draining(daemon_id: &str, draining: bool) -> NewEvent {
        let data = serde_json::json!({ "draining": draining });
        NewEvent::new("daemon.draining", None, Some(daemon_id), data)
    }

    /// The event as stored with `id` at `now`.
    pub fn stored(self, id: i64, now: Millis) -> Event {
        Event {
            id,
            kind: self.kind,
            task_id: self.task_id,
            daemon_id: self.daemon_id,
            data: self.data,
            at: rfc3339(now),
        }
    }
}
