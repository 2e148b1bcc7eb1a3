-- Attempts that ended without being the task's fault: refused by a daemon at capacity or
-- shutting down, or handed back by a daemon that stopped cleanly. `attempt` keeps counting
-- every dispatch (it is the fencing token); `attempt - returned_attempts` is what counts
-- against `max_attempts`.
ALTER TABLE tasks ADD COLUMN returned_attempts INTEGER NOT NULL DEFAULT 0;
