-- Finds the conversation a creator's request_id created within its window, or claims the window
-- for a fresh candidate id. Lives in the creator's slot, apart from the conversation's keys, so
-- it runs before create_conversation (a crash in between leaves a claim whose retry creates the
-- conversation under the claimed id).
-- KEYS: 1 P:{u:USER}:req:<digest>
-- ARGV: 1 candidate conversation id, 2 window (ms)
-- Returns {conversation id to create or find}.
local claimed = redis.call('GET', KEYS[1])
if claimed then
  return {claimed}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {ARGV[1]}
