-- The hot path: look a child up and, when asked and a record is visible, record the access and queue one
-- notification per LA owning a visible record, all in one atomic step. The lookup is audited either way; without
-- a visible record the audit entry carries no NHS number (its key is already the keyed hash).
-- KEYS[1] child records hash, KEYS[2] child access list, KEYS[3] child audit list, KEYS[4] notify queue,
-- KEYS[5] care-settings hash, KEYS[6] encounter key (may be unused)
-- ARGV[1] today (epoch day), ARGV[2] window, ARGV[3] UCPP window, ARGV[4] record ('1'/'0'), ARGV[5] encoded access,
-- ARGV[6] idempotency prefix, ARGV[7] now (epoch ms), ARGV[8] audit JSON with NHS number, ARGV[9] audit JSON
-- without, ARGV[10] inbox key prefix, ARGV[11] encounter JSON ('' = none), ARGV[12] nhs, ARGV[13] tag,
-- ARGV[14] encounter TTL seconds, ARGV[15] the access id, ARGV[16] ',LA1,LA2,': the LAs with a push channel (webhook
-- or FHIR), ARGV[17] the notification id namespace (16 bytes), ARGV[18] '1' to return the child's recent accesses
-- Every LA's notification goes into its pull inbox and the inbox index here (delivered to the pull channel at once);
-- only LAs with a push channel get a delivery-queue entry for the relays.
-- Returns {status, existing access ('' unless a repeat), recent, field1, json1, ...} for the visible records, where
-- status is 0 nothing recorded, 1 access recorded, 2 repeat of an access already recorded, and recent the child's
-- newest 25 accesses (with this one) when ARGV[18] asks for them and a record is visible, else empty.
-- uuid5 as core/access.py derives it: the notification id is the same whichever side computes it.
local function uuid5(ns, name)
  local h = redis.sha1hex(ns .. name)
  local variant = string.format('%x', tonumber(string.sub(h, 17, 17), 16) % 4 + 8)
  return string.sub(h, 1, 8) .. '-' .. string.sub(h, 9, 12) .. '-5' .. string.sub(h, 14, 16) .. '-' .. variant ..
    string.sub(h, 18, 20) .. '-' .. string.sub(h, 21, 32)
end
local ACCESS_LOG_MAX = 1000
local today, window, ucpp_window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local all = redis.call('HGETALL', KEYS[1])
local visible = {}
local by_la, la_order = {}, {}
for i = 1, #all, 2 do
  local rec = cjson.decode(all[i + 1])
  if is_visible(rec, today, window, ucpp_window) then
    visible[#visible + 1] = all[i]
    visible[#visible + 1] = all[i + 1]
    local bar = string.find(all[i], '|', 1, true)
    local la = string.sub(all[i], 1, bar - 1)
    if by_la[la] == nil then by_la[la] = {}; la_order[#la_order + 1] = la end
    local list = by_la[la]
    list[#list + 1] = {localId = string.sub(all[i], bar + 1), planType = rec.p, startDate = rec.s,
                       endDate = rec.e or cjson.null}
  end
end
local status, existing = 0, ''
local want_recent = ARGV[18] == '1'
local recent_out = {}
if ARGV[4] == '1' and #visible > 0 then
  local prefix = ARGV[6]
  local history = redis.call('LRANGE', KEYS[2], 0, 24)
  for _, entry in ipairs(history) do
    if string.sub(entry, 1, #prefix) == prefix then existing = entry; break end
  end
  if existing ~= '' then
    status = 2
    if want_recent then recent_out = history end
  else
    status = 1
    -- The access log: every access the retention period keeps, up to ACCESS_LOG_MAX; the history shown is the
    -- newest 25. The inbox entry refers to the log (its length now) instead of copying the 25 recent accesses.
    local logged = redis.call('LPUSH', KEYS[2], ARGV[5])
    if logged > ACCESS_LOG_MAX then
      redis.call('LTRIM', KEYS[2], 0, ACCESS_LOG_MAX - 1)
      logged = ACCESS_LOG_MAX
    end
    local recent = {ARGV[5]}
    for i = 1, math.min(#history, 24) do recent[#recent + 1] = history[i] end
    if want_recent then recent_out = recent end
    local names, seen = {}, {}
    for _, entry in ipairs(recent) do
      local ods = string.sub(entry, 1, string.find(entry, '\31', 1, true) - 1)
      if not seen[ods] then
        seen[ods] = true
        local v = redis.call('HGET', KEYS[5], ods)
        if v then names[ods] = v end
      end
    end
    local names_json = cjson.encode(names)
    for _, la in ipairs(la_order) do
      local ref = redis.call('XADD', ARGV[10] .. la, '*', 'nhs', ARGV[12], 'tag', ARGV[13], 'acc', ARGV[5],
        'n', logged, 'recs', cjson.encode(by_la[la]), 'cs', names_json, 'at', ARGV[7])
      redis.call('HSET', ARGV[10] .. la .. ':idx', uuid5(ARGV[17], ARGV[15] .. '|' .. la), ref)
      if string.find(ARGV[16], ',' .. la .. ',', 1, true) then
        redis.call('XADD', KEYS[4], '*', 'la', la, 'ref', ref, 'aid', ARGV[15])
      end
    end
    if ARGV[11] ~= '' then redis.call('SET', KEYS[6], ARGV[11], 'EX', tonumber(ARGV[14])) end
  end
elseif want_recent and #visible > 0 then
  recent_out = redis.call('LRANGE', KEYS[2], 0, 24)
end
if #visible > 0 then
  redis.call('LPUSH', KEYS[3], ARGV[8])
else
  redis.call('LPUSH', KEYS[3], ARGV[9])
end
local out = {status, existing, recent_out}
for i = 1, #visible do out[#out + 1] = visible[i] end
return out
