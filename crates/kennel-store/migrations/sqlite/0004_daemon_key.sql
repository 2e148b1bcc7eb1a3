-- The API key a daemon's machine id is bound to: the first daemon- or relay-scoped key that
-- authenticated as it. Another key cannot pose as that machine until this key is revoked.
ALTER TABLE daemons ADD COLUMN key_id TEXT;
