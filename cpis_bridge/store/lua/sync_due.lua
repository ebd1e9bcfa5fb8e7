-- Sync retries whose time has come go back into the sync queue, atomically (safe with several processes).
-- KEYS[1] sync delay zset (member "la\31lid\31queuedMs\31tombstone" -> due epoch ms), KEYS[2] sync queue stream
-- ARGV[1] now (epoch ms), ARGV[2] at most this many members. Returns how many moved.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  local parts, start = {}, 1
  for _ = 1, 3 do
    local at = string.find(member, '\31', start, true)
    if not at then break end
    parts[#parts + 1] = string.sub(member, start, at - 1)
    start = at + 1
  end
  parts[#parts + 1] = string.sub(member, start)
  if #parts == 4 then
    if parts[4] ~= '' then
      redis.call('XADD', KEYS[2], '*', 'la', parts[1], 'lid', parts[2], 'q', parts[3], 't', parts[4])
    else
      redis.call('XADD', KEYS[2], '*', 'la', parts[1], 'lid', parts[2], 'q', parts[3])
    end
  end
  redis.call('ZREM', KEYS[1], member)
end
return #due
