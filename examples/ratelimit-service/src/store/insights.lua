-- The console's heavy hitters in Redis: one space-saving summary per limit, shared by every
-- replica; it mirrors src/insights.rs (SpaceSaving::add).
-- KEYS[1]: the limit's counts (sorted set), KEYS[2]: their overestimates (hash), one slot.
-- ARGV: key value, amount, capacity, ttl_ms.
local value, amount, capacity, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call("ZSCORE", KEYS[1], value) then
  redis.call("ZINCRBY", KEYS[1], amount, value)
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
return 1
