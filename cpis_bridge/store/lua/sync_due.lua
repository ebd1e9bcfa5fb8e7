-- Sync retries whose time has come go back into the sync queue, atomically (safe with several processes).
-- KEYS[1] sync delay zset (member "la\31lid\31queuedMs\31attempts\31tombstone" -> due epoch ms; members written by
-- earlier releases have no attempts part), KEYS[2] sync queue stream
-- ARGV[1] now (epoch ms), ARGV[2] at most this many members. Returns how many moved.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  local parts, start = {}, 1
  for _ = 1, 4 do
    local at = string.find(member, '\31', start, true)
    if not at then break end
    parts[#parts + 1] = string.sub(member, start, at - 1)
    start = at + 1
  end
  parts[#parts + 1] = string.sub(member, start)
  local tomb, attempts = nil, '0'
  if #parts == 5 then
    attempts, tomb = parts[4], parts[5]
  elseif #parts == 4 then
    tomb = parts[4]
  end
  if tomb ~= nil then
    local fields = {'la', parts[1], 'lid', parts[2], 'q', parts[3]}
    if attempts ~= '0' and attempts ~= '' then
      fields[#fields + 1] = 'n'
      fields[#fields + 1] = attempts
    end
    if tomb ~= '' then
      fields[#fields + 1] = 't'
      fields[#fields + 1] = tomb
    end
    redis.call('XADD', KEYS[2], '*', unpack(fields))
  end
  redis.call('ZREM', KEYS[1], member)
end
return #due
