-- Extends the lease if the caller holds it.
-- ARGV: 1 holder  2 lease until
-- Returns {'renewed'} | {'lease_lost'}.
if not held_by(ARGV[1]) then
  return {'lease_lost'}
end
redis.call('HSET', K_SESSION, 'until', ARGV[2])
return {'renewed'}
