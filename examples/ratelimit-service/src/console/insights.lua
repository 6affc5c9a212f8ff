-- The console's heavy hitters in Redis: one space-saving summary per limit, shared by every
-- replica; it mirrors src/insights.rs (SpaceSaving::add).
-- KEYS[1]: the limit's counts (sorted set), KEYS[2]: their overestimates (hash), one slot.
-- ARGV: key value, amount, capacity, ttl_ms.
local value, amount, capacity, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local count = redis.call("ZSCORE", KEYS[1], value)
if count then
  -- A refund lowers a key kept (never below zero); one not kept is dropped.
  redis.call("ZADD", KEYS[1], math.max(0, tonumber(count) + amount), value)
elseif amount <= 0 then
  return {0}
elseif redis.call("ZCARD", KEYS[1]) < capacity then
  redis.call("ZADD", KEYS[1], amount, value)
else
  -- The least counted goes; the newcomer inherits its count as a possible overestimate.
  local least = redis.call("ZRANGE", KEYS[1], 0, 0, "WITHSCORES")
  local floor = tonumber(least[2])
  redis.call("ZREM", KEYS[1], least[1])
  redis.call("HDEL", KEYS[2], least[1])
  redis.call("ZADD", KEYS[1], floor + amount, value)
  redis.call("HSET", KEYS[2], value, string.format("%.0f", floor))
end
redis.call("PEXPIRE", KEYS[1], ttl)
redis.call("PEXPIRE", KEYS[2], ttl)
return {1}
