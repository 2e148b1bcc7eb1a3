-- A daemon's live task count (`active_tasks` in every daemon read) counts only its live tasks,
-- not every task it ever ran: listing daemons stays cheap however long the history grows.
CREATE INDEX tasks_daemon_live ON tasks (daemon_id) WHERE status IN ('dispatched', 'running', 'paused');
