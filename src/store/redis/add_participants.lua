-- Adds the users who are not participants yet, on behalf of participant ARGV[6].
-- ARGV: 6 acting user, 7 participant limit, 8.. users
-- Returns {rejection} | snapshot({'unchanged'}) | snapshot({'changed', event member}).
local by = ARGV[6]
local refused = refusal_for(by)
if refused then
  return refused
end
local added, seen = {}, {}
for i = 8, #ARGV do
  local user = ARGV[i]
  if not seen[user] and not is_member(user) then
    seen[user] = true
    added[#added + 1] = user
  end
end
if #added == 0 then
  return snapshot({'unchanged'})
end
if redis.call('ZCARD', K_MEMBERS) + #added > tonumber(ARGV[7]) then
  return {'too_many_participants'}
end
for _, user in ipairs(added) do
  local order = redis.call('HINCRBY', K_META, 'joins', 1)
  redis.call('ZADD', K_MEMBERS, int(order), user)
end
local participants = redis.call('ZRANGE', K_MEMBERS, 0, -1)
local now = now_ms()
local member = append_event(now, '{"ParticipantsChanged":{"added":' .. json_array(added)
  .. ',"removed":[],"changed_by":' .. cjson.encode(by)
  .. ',"participants":' .. json_array(participants) .. '}}')
trim(now)
return snapshot({'changed', member})
