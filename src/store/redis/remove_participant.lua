-- Removes ARGV[7] on behalf of ARGV[6] (themselves, or anyone when ARGV[6] created it).
-- ARGV: 6 acting user, 7 user to remove
-- Returns {rejection} | snapshot({'changed', event member}).
local by, user = ARGV[6], ARGV[7]
local refused = refusal_for(by)
if refused then
  return refused
end
if by ~= user and by ~= redis.call('HGET', K_META, 'created_by') then
  return {'not_creator'}
end
if not is_member(user) then
  return {'participant_not_found'}
end
redis.call('ZREM', K_MEMBERS, user)
local participants = redis.call('ZRANGE', K_MEMBERS, 0, -1)
local now = now_ms()
local member = append_event(now, '{"ParticipantsChanged":{"added":[],"removed":' .. json_array({user})
  .. ',"changed_by":' .. cjson.encode(by)
  .. ',"participants":' .. json_array(participants) .. '}}')
trim(now)
return snapshot({'changed', member})
