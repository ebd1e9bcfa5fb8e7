-- A notification's recentAccesses, read from the child's access log by reference (access.lua keeps a copy of the
-- access and the log's length right after pushing it, not a copy of the 25): the access and the 24 before it.
-- KEYS[1] child access list (newest first); ARGV[1] the access (encoded), ARGV[2] the list's length right after it
-- was pushed. Accesses are only ever added at the head; removals (purge by age, the length cap) can only move an
-- entry towards the head, so the access sits at index LLEN - ARGV[2] or further on: look there first, then onwards.
-- Returns the up to 25 encoded accesses joined by \30, newest first; the access alone when the log no longer holds it.
local acc = ARGV[1]
local pos = redis.call('LLEN', KEYS[1]) - tonumber(ARGV[2])
if pos < 0 then pos = 0 end
while true do
  local chunk = redis.call('LRANGE', KEYS[1], pos, pos + 63)
  if #chunk == 0 then return acc end
  for i, entry in ipairs(chunk) do
    if entry == acc then
      local at = pos + i - 1
      if i + 24 <= #chunk or #chunk < 64 then  -- the 25 are in this chunk, or the log ends in it
        return table.concat(chunk, '\30', i, math.min(i + 24, #chunk))
      end
      return table.concat(redis.call('LRANGE', KEYS[1], at, at + 24), '\30')
    end
  end
  pos = pos + #chunk
end
