"""SQL the migrations share: the ``events_history`` view of both event tables.

Kept out of the migrations so a later one that rebuilds a table under the view makes the same
view again.
"""

# A token row's source and model by a subquery each, not a join: a branch of one table is pulled
# up into the union, so a query in time order reads each partition's time index and merges
# them (a join made it read and sort every row).
_NAMES = {
    "source": "(SELECT c.source FROM events_channel c WHERE c.id = t.channel_id)",
    "model": "(SELECT c.model FROM events_channel c WHERE c.id = t.channel_id)",
}

HISTORY_VIEW = {
    "postgresql": """
CREATE VIEW events_history AS
SELECT id, type, "timestamp", source, generation_id, seq, model, payload, ingested_at,
       NULL::text AS token, NULL::double precision AS logprob
  FROM events_event
UNION ALL
SELECT t.id, 'tokenGenerated'::varchar(32), t."timestamp", {source}, t.generation_id, t.seq::bigint, {model},
       CASE WHEN t.logprob IS NULL THEN jsonb_build_object('model', {model}, 'token', t.token)
            ELSE jsonb_build_object('model', {model}, 'token', t.token, 'logprob', t.logprob::float8) END,
       t.ingested_at, t.token, t.logprob::float8
  FROM events_token t
""".format(**_NAMES),
    "sqlite": """
CREATE VIEW events_history AS
SELECT id, type, "timestamp", source, generation_id, seq, model, payload, ingested_at,
       NULL AS token, NULL AS logprob
  FROM events_event
UNION ALL
SELECT t.id, 'tokenGenerated', t."timestamp", {source}, t.generation_id, t.seq, {model},
       CASE WHEN t.logprob IS NULL THEN json_object('model', {model}, 'token', t.token)
            ELSE json_object('model', {model}, 'token', t.token, 'logprob', t.logprob) END,
       t.ingested_at, t.token, t.logprob
  FROM events_token t
""".format(**_NAMES),
}
