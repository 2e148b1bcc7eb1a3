-- Event ids from a sequence instead of the `event_ids` counter row. The row made every
-- transaction that stores events wait for the previous one's commit, its flush to disk
-- included: the commits of all coordinators went one at a time. A sequence hands out ids
-- without a lock, so they are no longer committed in their order, and an id may go missing
-- for good (its transaction rolled back). Readers must not pass an id that may still be
-- committed; how they know (see `events_after` in the PostgreSQL store):
--
-- - a writer has a transaction id before it draws event ids (`draw_event_ids` makes sure);
-- - a reader that finds an id missing below an event E takes a transaction id of its own
--   afterwards: every transaction that drew an id below E's had its id before, so below the
--   reader's;
-- - once no transaction below the reader's id is running (its snapshot's `xmin` has passed
--   it), the missing id is committed and visible, or never will be.
--
-- Upgrade every coordinator at once: one of an earlier version still running fails its
-- writes (its counter is gone) instead of reusing ids.
CREATE SEQUENCE event_id_seq;
SELECT setval('event_id_seq', (SELECT last FROM event_ids) + 1, false);
DROP TABLE event_ids;

CREATE FUNCTION draw_event_ids(n integer) RETURNS bigint[]
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    -- The transaction's id first: it must be below that of any reader that sees these ids
    -- missing.
    PERFORM pg_current_xact_id();
    RETURN ARRAY(SELECT nextval('event_id_seq') FROM generate_series(1, n));
END
$$;
