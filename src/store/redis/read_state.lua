#!lua flags=no-writes
-- A user's view of a conversation.
-- KEYS: 1 read, 2 dead, 3 by:<user>, 4 msgs, 5 msg
-- ARGV: 1 user
-- Returns {read sequence, unread count, newest stored message or ''}
local read = redis.call('HGET', KEYS[1], ARGV[1]) or '0'
local after = '(' .. read
-- Messages after it (tombstones included), minus the deleted ones, minus the user's own.
local unread = redis.call('ZCOUNT', KEYS[4], after, '+inf') - redis.call('ZCOUNT', KEYS[2], after, '+inf')
  - redis.call('ZCOUNT', KEYS[3], after, '+inf')
local newest = redis.call('ZREVRANGE', KEYS[4], 0, 0)
local last = ''
if #newest > 0 then
  last = redis.call('HGET', KEYS[5], newest[1]) or ''
end
return {read, string.format('%d', unread), last}
