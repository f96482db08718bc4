-- Ends the caller's lease; another holder's stays.
-- ARGV: 1 holder
-- Returns {'released'} | {'unchanged'}.
if not held_by(ARGV[1]) then
  return {'unchanged'}
end
redis.call('HSET', K_SESSION, 'holder', '', 'until', '0')
return {'released'}
