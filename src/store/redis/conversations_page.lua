#!lua flags=no-writes
-- A page of a user's conversation index, newest activity first; within one activity, ids
-- descending (ZREVRANGEBYSCORE's order), starting strictly after the cursor.
-- KEYS: 1 P:{u:USER}:convs
-- ARGV: 1 cursor activity ('+inf' without a cursor), 2 cursor conversation id ('' without), 3 count
-- Returns {id, activity, id, activity, ...}
-- Byte order, like Redis' own tie order (Lua's `<` on strings follows the locale).
local function bytes_before(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then
      return x < y
    end
  end
  return #a < #b
end

local max, after_id, count = ARGV[1], ARGV[2], tonumber(ARGV[3])
local max_score = tonumber(max)
local out = {}
local offset = 0
local batch = count + 16
while #out < 2 * count do
  local page = redis.call('ZREVRANGEBYSCORE', KEYS[1], max, '-inf', 'WITHSCORES', 'LIMIT', offset, batch)
  for i = 1, #page, 2 do
    local id, score = page[i], page[i + 1]
    if after_id == '' or tonumber(score) < max_score or bytes_before(id, after_id) then
      out[#out + 1] = id
      out[#out + 1] = score
      if #out >= 2 * count then
        break
      end
    end
  end
  if #page < 2 * batch then
    break
  end
  offset = offset + batch
end
return out
