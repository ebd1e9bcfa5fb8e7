-- Purge: drop audit entries older than the cutoff from the tail of an audit list (newest first, LPUSHed).
-- KEYS[1] audit list; ARGV[1] cutoff ISO instant (UTC, Z: compares as text), ARGV[2] at most this many.
-- Returns the number removed.
local cutoff, limit = ARGV[1], tonumber(ARGV[2])
local removed = 0
while removed < limit do
  local last = redis.call('LINDEX', KEYS[1], -1)
  if not last then break end
  local ok, entry = pcall(cjson.decode, last)
  local at = ok and type(entry) == 'table' and entry.at or nil
  if type(at) ~= 'string' or at >= cutoff then break end
  redis.call('RPOP', KEYS[1])
  removed = removed + 1
end
return removed
