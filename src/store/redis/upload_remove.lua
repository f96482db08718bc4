-- Forgets the session and its entry among the owner's unfinished sessions.
-- ARGV: 1 digest
-- Returns {'removed'}.
redis.call('DEL', K_SESSION)
redis.call('ZREM', K_OPEN, ARGV[1])
return {'removed'}
