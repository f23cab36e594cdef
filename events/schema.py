"""SQL the migrations share: the ``events_history`` view of both event tables.

Kept out of the migrations so a later one that rebuilds a table under the view makes the same
view again.
"""

HISTORY_VIEW = {
    "postgresql": """
CREATE VIEW events_history AS
SELECT id, type, "timestamp", source, generation_id, seq, model, payload, ingested_at,
       NULL::text AS token, NULL::double precision AS logprob
  FROM events_event
UNION ALL
SELECT t.id, 'tokenGenerated'::varchar(32), t."timestamp", c.source, t.generation_id, t.seq::bigint, c.model,
       CASE WHEN t.logprob IS NULL THEN jsonb_build_object('model', c.model, 'token', t.token)
            ELSE jsonb_build_object('model', c.model, 'token', t.token, 'logprob', t.logprob) END,
       t.ingested_at, t.token, t.logprob
  FROM events_token t JOIN events_channel c ON c.id = t.channel_id
""",
    "sqlite": """
CREATE VIEW events_history AS
SELECT id, type, "timestamp", source, generation_id, seq, model, payload, ingested_at,
       NULL AS token, NULL AS logprob
  FROM events_event
UNION ALL
SELECT t.id, 'tokenGenerated', t."timestamp", c.source, t.generation_id, t.seq, c.model,
       CASE WHEN t.logprob IS NULL THEN json_object('model', c.model, 'token', t.token)
            ELSE json_object('model', c.model, 'token', t.token, 'logprob', t.logprob) END,
       t.ingested_at, t.token, t.logprob
  FROM events_token t JOIN events_channel c ON c.id = t.channel_id
""",
}
