-- A source's reservation ring (src/store/reservations.rs mirrors it): two bits per sequence
-- (1 = reserved, 2 = released) for the last `slots` sequences below a high-water mark.
--
-- KEYS: the bit string, the high-water mark. ARGV: op ("mark" | "release"), seq, slots, ttl_ms.
-- mark returns 1 (recorded), 0 (released first: the reservation must not stand), 2 (too old);
-- release returns 1 when a recorded reservation is released now, else 0.

local op = ARGV[1]
local seq = tonumber(ARGV[2])
local slots = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local high = tonumber(redis.call("GET", KEYS[2]) or "-1")

local function pos(q) return (q % slots) * 2 end

local flags
if high >= 0 and seq + slots <= high then
  flags = nil
elseif seq > high then
  flags = 0
else
  local p = pos(seq)
  flags = redis.call("GETBIT", KEYS[1], p) + 2 * redis.call("GETBIT", KEYS[1], p + 1)
end

if flags == nil then
  if op == "mark" then return {2} end
  return {0}
end
if op == "mark" and flags >= 2 then return {0} end

-- Forget the slots a new high-water mark overtakes: whole bytes at once, the ends bit by bit.
local function clear(from, to)
  local q = from
  while q <= to do
    local p = pos(q)
    if p % 8 == 0 and to - q + 1 >= 4 then
      local bytes = math.min(math.floor((to - q + 1) / 4), (slots * 2 - p) / 8)
      redis.call("SETRANGE", KEYS[1], p / 8, string.rep("\0", bytes))
      q = q + bytes * 4
    else
      redis.call("SETBIT", KEYS[1], p, 0)
      redis.call("SETBIT", KEYS[1], p + 1, 0)
      q = q + 1
    end
  end
end

if seq > high then
  if high < 0 or seq - high >= slots then
    redis.call("DEL", KEYS[1])
  else
    clear(high + 1, seq - 1)
  end
  redis.call("SET", KEYS[2], string.format("%.0f", seq), "PX", ttl)
else
  redis.call("PEXPIRE", KEYS[2], ttl)
end

local p = pos(seq)
local answer = 1
if op == "mark" then
  redis.call("SETBIT", KEYS[1], p, 1)
  redis.call("SETBIT", KEYS[1], p + 1, 0)
else
  if flags ~= 1 then answer = 0 end
  redis.call("SETBIT", KEYS[1], p, 0)
  redis.call("SETBIT", KEYS[1], p + 1, 1)
end
redis.call("PEXPIRE", KEYS[1], ttl)
return {answer}
