-- The Redis store's check and settlement, atomically, in one round trip.
-- It mirrors src/meter.rs and src/store/mod.rs exactly; the behavioural suite runs the same
-- cases against both stores.
--
-- KEYS: one hash per counter (field = meter, value = "a,b,c,budget": its state and the
--       budget last applied), then, when ARGV[6] is a
--       report's sequence number, its source's report ring: a bit string and its high-water
--       mark (src/store/sources.rs mirrors it).
-- ARGV: mode ("check" | "settle"), now_ms (-1: Redis's own clock, so every replica of the
--       service counts on one clock), amount (reserve | excess charged now), refund,
--       refund_at_ms (-1: now), report seq (-1: none), ring slots, ring ttl_ms, then the
--       amount and refund in money (micro units), then a check's trim: min tokens (-1: no
--       trim), the fixed tokens and micro units (wire::Trim), then per counter: meter count,
--       shadow (1: a shadow limit, which never denies nor trims), k alert thresholds (0 but in
--       a report's settlement) and the k thresholds in thousandths, ascending; and per meter:
--       field, kind (w|f|c|b), p1, p2, p3, ttl_ms, unit (0 tokens, 1 money), then the spend
--       each of the k thresholds is reached at.
--       A calendar meter (c): p1 tokens, p2 the period's start, p3 its end; state
--       {start, used, end}.
-- Returns: check: {allowed, now, granted tokens (-1: not trimmed), granted micro units, then
--          remaining, reset, retry per meter, then per counter 1 when it is a shadow limit
--          that could not have taken what was asked};
--          settle: {1 applied | 0 duplicate | 2 stale id, now, then per meter that reached
--          thresholds not yet raised in its alert window: counter, meter, the highest
--          threshold raised before (thousandths), the highest now, its spend}; what was raised
--          is kept in the counter's hash as "a:<field>" = "window start,thousandths"
--          (crossed() in src/store/model.rs mirrors it);
--          either: {-1, now} when a calendar meter's period does not hold at Redis's time.

local mode = ARGV[1]
local now = tonumber(ARGV[2])
if now < 0 then
  local t = redis.call("TIME")
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local amounts = {tonumber(ARGV[3]), tonumber(ARGV[9])}
local refunds = {tonumber(ARGV[4]), tonumber(ARGV[10])}
local refund_at = tonumber(ARGV[5])
if refund_at < 0 then refund_at = now end
local seq = tonumber(ARGV[6])
local slots = tonumber(ARGV[7])
local ring_ttl = tonumber(ARGV[8])
local trim_min = tonumber(ARGV[11])
local fixed = {tonumber(ARGV[12]), tonumber(ARGV[13])}
local FIRST = 14
local ncounters = #KEYS
if seq >= 0 then ncounters = ncounters - 2 end

-- One clock: a calendar meter was planned for the period that holds at the service's time; if
-- Redis's time is in another one, nothing is done and the service plans again at Redis's
-- time ({-1, now}). Checked before anything is written (the report ring included).
do
  local a = FIRST
  for _ = 1, ncounters do
    local n = tonumber(ARGV[a]); local k = tonumber(ARGV[a + 2]); a = a + 3 + k
    for _ = 1, n do
      if ARGV[a + 1] == "c" and (now < tonumber(ARGV[a + 3]) or now >= tonumber(ARGV[a + 4])) then
        return {-1, now}
      end
      a = a + 7 + k
    end
  end
end

-- Whether report `seq` is new to its source's ring (marking it seen): 1 new, 0 seen, 2 stale.
local function first_time(bits, highkey)
  local high = tonumber(redis.call("GET", highkey) or "-1")
  if high >= 0 and seq + slots <= high then return 2 end
  if seq <= high then
    if redis.call("GETBIT", bits, seq % slots) == 1 then return 0 end
  else
    if high < 0 or seq - high >= slots then
      redis.call("DEL", bits)
    else
      -- Forget the slots the new high-water mark overtakes: whole bytes at once.
      local q = high + 1
      while q < seq do
        local p = q % slots
        if p % 8 == 0 and seq - q >= 8 then
          local bytes = math.min(math.floor((seq - q) / 8), (slots - p) / 8)
          redis.call("SETRANGE", bits, p / 8, string.rep("\0", bytes))
          q = q + bytes * 8
        else
          redis.call("SETBIT", bits, p, 0)
          q = q + 1
        end
      end
    end
    redis.call("SET", highkey, string.format("%.0f", seq), "PX", ring_ttl)
  end
  redis.call("SETBIT", bits, seq % slots, 1)
  redis.call("PEXPIRE", bits, ring_ttl)
  redis.call("PEXPIRE", highkey, ring_ttl)
  return 1
end

if mode == "settle" and seq >= 0 then
  local fresh = first_time(KEYS[#KEYS - 1], KEYS[#KEYS])
  if fresh ~= 1 then return {fresh, now} end
end

local function decay(value, allowed, w)
  if value <= allowed then return 0 end
  if allowed < 0 then allowed = 0 end
  return math.ceil(w - allowed * w / value)
end

local function advance(m, s)
  if m.kind == "b" then
    if s[3] == 0 then s[1] = m.p1; s[2] = now; s[3] = 1; return end
    if now <= s[2] then return end
    local intervals = math.floor((now - s[2]) / m.p3)
    if intervals > 0 then
      s[1] = math.min(m.p1, s[1] + intervals * m.p2)
      s[2] = s[2] + intervals * m.p3
      if s[1] >= m.p1 then s[2] = now end
    end
  elseif m.kind == "c" then
    -- A period never moves back.
    if m.p2 > s[1] then s[1] = m.p2; s[2] = 0; s[3] = m.p3 end
  else
    local w = m.p2
    local start = now - (now % w)
    -- A clock behind the one that last wrote never moves the window back.
    if start <= s[1] then return end
    local previous = 0
    if m.kind == "w" and s[1] == start - w then previous = s[2] end
    s[1] = start; s[2] = 0; s[3] = previous
  end
end

-- remaining, reset_ms, retry_ms
local function status(m, s, need)
  local limit = m.p1
  need = math.max(1, math.min(need, limit))
  if m.kind == "b" then
    local function until_at(target)
      if s[1] >= target then return 0 end
      local n = math.floor((target - s[1] + m.p2 - 1) / m.p2)
      return math.max(s[2] + n * m.p3 - now, 1)
    end
    return math.max(0, math.min(limit, s[1])), until_at(limit), until_at(need)
  end
  if m.kind == "c" then
    if now >= s[3] then return limit, 0, 0 end
    local remaining = math.max(0, math.min(limit, limit - math.max(s[2], 0)))
    local until_end = math.max(s[3] - now, 1)
    local reset = 0
    if s[2] > 0 then reset = until_end end
    local retry = 0
    if remaining < need then retry = until_end end
    return remaining, reset, retry
  end
  local w = m.p2
  local sliding = m.kind == "w"
  local elapsed = math.max(0, math.min(w, now - s[1]))
  local weighted = 0
  if sliding and s[3] ~= 0 then weighted = math.ceil(s[3] * (w - elapsed) / w) end
  local used = math.max(s[2] + weighted, 0)
  local remaining = math.max(0, math.min(limit, limit - used))
  local reset = 0
  if s[2] > 0 then
    if sliding then reset = s[1] + 2 * w - now else reset = s[1] + w - now end
  elseif sliding and s[3] > 0 then
    reset = s[1] + w - now
  end
  local retry = 0
  if remaining < need then
    local allowed = limit - need
    local at
    if (not sliding) or s[2] > allowed then
      at = s[1] + w
      if sliding then at = at + decay(s[2], allowed, w) end
    else
      at = s[1] + decay(s[3], allowed - s[2], w)
    end
    retry = math.max(at - now, 1)
  end
  return remaining, reset, retry
end

-- What a window or calendar meter has spent now, unclamped (mirrors Meter::used), and the
-- start of its alert window (Meter::alert_window).
local function spent(m, s)
  if m.kind == "c" then
    if now >= s[3] then return 0, m.p2 end
    return math.max(s[2], 0), m.p2
  end
  local w = m.p2
  local elapsed = math.max(0, math.min(w, now - s[1]))
  local weighted = 0
  if m.kind == "w" and s[3] ~= 0 then weighted = math.ceil(s[3] * (w - elapsed) / w) end
  return math.max(s[2] + weighted, 0), now - (now % w)
end

local function charge(m, s, delta)
  if m.kind == "b" then s[1] = math.min(m.p1, s[1] - delta) else s[2] = s[2] + delta end
end

-- A reservation's unused tokens go back to the window it was taken in while that window
-- still counts, never below zero; to a bucket never above its maximum.
local function give_back(m, s, tokens, at)
  if tokens <= 0 then return end
  if m.kind == "b" then s[1] = math.min(m.p1, s[1] + tokens); return end
  if m.kind == "c" then
    if at >= s[1] and s[2] > 0 then s[2] = math.max(0, s[2] - tokens) end
    return
  end
  local w = m.p2
  local start = at - (at % w)
  local slot
  if start >= s[1] then slot = 2
  elseif m.kind == "w" and start == s[1] - w then slot = 3
  else return end
  if s[slot] > 0 then s[slot] = math.max(0, s[slot] - tokens) end
end

-- The field a stored field is counted under now (mirrors Meter::identity): fields written
-- before budgets left the identity (w|f:<tokens>:<ms>, c:<tokens>:<zone>) are adopted.
local function identity(f)
  local prefix, rest = string.match(f, "^(%$%u%u%u:)(.*)$")
  if not prefix then prefix = ""; rest = f end
  local k, _, last = string.match(rest, "^(%a):(-?%d+):(-?%d+)$")
  if k == "w" or k == "f" then return prefix .. "t:" .. last end
  if k == "c" then return prefix .. "c:" .. last end
  return f
end

-- Load every meter's state.
local counters = {}
local shadows = {}
local thresholds = {}
local arg = FIRST
for c = 1, ncounters do
  local n = tonumber(ARGV[arg]); shadows[c] = ARGV[arg + 1] == "1"
  local k = tonumber(ARGV[arg + 2])
  local alerts = {}
  for j = 1, k do alerts[j] = tonumber(ARGV[arg + 2 + j]) end
  thresholds[c] = alerts
  arg = arg + 3 + k
  local meters = {}
  for i = 1, n do
    local m = {field = ARGV[arg], kind = ARGV[arg + 1], p1 = tonumber(ARGV[arg + 2]),
               p2 = tonumber(ARGV[arg + 3]), p3 = tonumber(ARGV[arg + 4]), ttl = tonumber(ARGV[arg + 5]),
               unit = tonumber(ARGV[arg + 6]) + 1, reached_at = {}}
    for j = 1, k do m.reached_at[j] = tonumber(ARGV[arg + 6 + j]) end
    arg = arg + 7 + k
    local raw = redis.call("HGET", KEYS[c], m.field)
    if not raw and m.kind ~= "b" then
      -- A state stored under an older name of this meter carries on under the new one.
      local all = redis.call("HGETALL", KEYS[c])
      for j = 1, #all, 2 do
        if all[j] ~= m.field and identity(all[j]) == m.field then
          raw = all[j + 1]
          redis.call("HDEL", KEYS[c], all[j])
          break
        end
      end
    end
    local s = {0, 0, 0}
    if raw then
      local a, b, d = string.match(raw, "^(-?%d+),(-?%d+),(-?%d+)")
      if a then s = {tonumber(a), tonumber(b), tonumber(d)} end
    end
    advance(m, s)
    m.state = s
    meters[i] = m
  end
  counters[c] = meters
end

-- Whether every meter of counter `c` can take `amount` ({tokens, micros}).
local function takes(c, amount)
  for _, m in ipairs(counters[c]) do
    local _, _, retry = status(m, m.state, math.max(amount[m.unit], 1))
    if retry > 0 then return false end
  end
  return true
end

-- Whether every counter that decides (shadow limits never do) can take `amount`.
local function fits(amount)
  for c = 1, ncounters do
    if not shadows[c] and not takes(c, amount) then return false end
  end
  return true
end

-- A trimmed grant (mirrors wire::Trim and grant() in src/store/model.rs, with the same
-- floating-point operations): the largest tokens every meter can pay for, and their cost.
local function grant()
  local span = amounts[1] - fixed[1]
  local price = 0
  if span > 0 then price = (amounts[2] - fixed[2]) / span end
  local function cost(t)
    if span <= 0 or t >= amounts[1] then return amounts[2] end
    return fixed[2] + math.ceil((t - fixed[1]) * price)
  end
  local t = amounts[1]
  for c = 1, ncounters do
    for _, m in ipairs(shadows[c] and {} or counters[c]) do
      local remaining = status(m, m.state, 1)
      if m.unit == 1 then
        t = math.min(t, remaining)
      else
        local left = remaining - fixed[2]
        if left < 0 then return nil end
        if span > 0 and price > 0 then
          local most = math.min(fixed[1] + math.floor(left / price), amounts[1])
          if most > fixed[1] and cost(most) > remaining then most = most - 1 end
          t = math.min(t, most)
        end
      end
    end
  end
  if t < trim_min then return nil end
  return {t, cost(t)}
end

local out
if mode == "check" then
  local allowed = 1
  local granted = {-1, 0}
  if trim_min >= 0 then
    -- The whole reserve must fit what is left, else the largest grant that does.
    local g = grant()
    if g == nil or not fits(g) then
      allowed = 0
    elseif g[1] < amounts[1] then
      amounts = g; granted = g
    end
  elseif not fits(amounts) then
    allowed = 0
  end
  out = {allowed, now, granted[1], granted[2]}
  local shadow_denied = {}
  for c = 1, ncounters do
    shadow_denied[c] = 0
    if shadows[c] and not takes(c, amounts) then shadow_denied[c] = 1 end
  end
  for c = 1, ncounters do
    for _, m in ipairs(counters[c]) do
      local amount = amounts[m.unit]
      if allowed == 1 and amount > 0 then charge(m, m.state, amount) end
      local remaining, reset, retry = status(m, m.state, math.max(amount, 1))
      out[#out + 1] = remaining; out[#out + 1] = reset; out[#out + 1] = retry
    end
  end
  for c = 1, ncounters do out[#out + 1] = shadow_denied[c] end
else
  for c = 1, ncounters do
    for _, m in ipairs(counters[c]) do
      charge(m, m.state, amounts[m.unit])
      give_back(m, m.state, refunds[m.unit], refund_at)
    end
  end
  out = {1, now}
  for c = 1, ncounters do
    local alerts = thresholds[c]
    for i, m in ipairs(counters[c]) do
      local used, start = 0, 0
      if #alerts > 0 and m.kind ~= "b" then used, start = spent(m, m.state) end
      -- Below the lowest threshold nothing can be raised: no need to read the mark.
      if #alerts > 0 and m.kind ~= "b" and used >= m.reached_at[1] then
        local mark = "a:" .. m.field
        local at, raised = string.match(redis.call("HGET", KEYS[c], mark) or "", "^(-?%d+),(-?%d+)")
        at = tonumber(at or "-1"); raised = tonumber(raised or "0")
        -- A mark from a later window (a replica whose clock is ahead wrote it) stands.
        if at <= start then
          if at < start then raised = 0 end
          local highest = raised
          for j = 1, #alerts do
            if alerts[j] > raised and used >= m.reached_at[j] then highest = alerts[j] end
          end
          if highest > raised then
            redis.call("HSET", KEYS[c], mark, string.format("%.0f,%.0f", start, highest))
            out[#out + 1] = c; out[#out + 1] = i; out[#out + 1] = raised
            out[#out + 1] = highest; out[#out + 1] = used
          end
        end
      end
    end
  end
end

-- Store states back; a counter lives as long as its longest-lived meter needs.
for c = 1, ncounters do
  local ttl = 0
  for _, m in ipairs(counters[c]) do
    local s = m.state
    -- The budget applied goes beside the state, for read-only lookups (it is no part of the
    -- meter's identity).
    redis.call("HSET", KEYS[c], m.field,
      string.format("%.0f,%.0f,%.0f,%.0f", s[1], s[2], s[3], m.p1))
    if m.ttl > ttl then ttl = m.ttl end
  end
  local current = redis.call("PTTL", KEYS[c])
  if current < ttl then redis.call("PEXPIRE", KEYS[c], ttl) end
end
return out
