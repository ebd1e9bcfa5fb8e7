-- One filtered page of an LA's inbox, read inside Redis: newest first from ARGV[1] ("+" or "(<id>") down to ARGV[2]
-- ("-" or an id), reading at most ARGV[4] entries, keeping those from care setting ARGV[5] ("" any) and with
-- acknowledged flag ARGV[6] ("" any, "1", "0"), until ARGV[3] are kept. Only kept entries leave Redis, so a
-- selective filter costs the service nothing for the entries it skips.
-- KEYS[1] inbox stream, KEYS[2] acknowledged set.
-- Returns {kept ({id, fields, acked 0/1} each), last id read ("" when the range ran out), how many were read}.
local start, oldest = ARGV[1], ARGV[2]
local want, budget = tonumber(ARGV[3]), tonumber(ARGV[4])
local setting, acked = ARGV[5], ARGV[6]
local prefix = setting .. "\31"
local kept, read, last = {}, 0, ""
while read < budget do
  local n = math.min(500, budget - read)
  local rows = redis.call("XREVRANGE", KEYS[1], start, oldest, "COUNT", n)
  for _, row in ipairs(rows) do
    local id, f = row[1], row[2]
    read = read + 1
    last = id
    local ok = true
    if setting ~= "" then
      local acc = ""
      for i = 1, #f, 2 do
        if f[i] == "acc" then
          acc = f[i + 1]
          break
        end
      end
      ok = string.sub(acc, 1, #prefix) == prefix
    end
    if ok then
      local flag = redis.call("SISMEMBER", KEYS[2], id)
      if acked == "" or (flag == 1) == (acked == "1") then
        kept[#kept + 1] = {id, f, flag}
        if #kept >= want then
          return {kept, last, read}
        end
      end
    end
  end
  if #rows < n then
    return {kept, "", read}
  end
  start = "(" .. last
end
return {kept, last, read}
