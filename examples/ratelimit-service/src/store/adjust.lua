-- An operator's action on one counter (the admin API), atomically; mirrors
-- MemoryStore::adjust. KEYS[1]: the counter's hash.
-- ARGV: "reset" | "grant", amount (grant): taken off what every window has used (a bucket
-- gains it), so this window admits that much more. Returns the meters changed.
if ARGV[1] == "reset" then
  -- The meters, not the alert marks ("a:<field>") kept beside them.
  local n = 0
  for _, field in ipairs(redis.call("HKEYS", KEYS[1])) do
    if string.sub(field, 1, 2) ~= "a:" then n = n + 1 end
  end
  redis.call("DEL", KEYS[1])
  return {n}
end
local amount = tonumber(ARGV[2])
local fields = redis.call("HGETALL", KEYS[1])
local n = 0
for i = 1, #fields, 2 do
  local field, raw = fields[i], fields[i + 1]
  local kind = string.match(field, "^%$%u%u%u:(%a)") or string.sub(field, 1, 1)
  local a, b, c, rest = string.match(raw, "^(-?%d+),(-?%d+),(-?%d+)(.*)$")
  if a then
    a, b, c = tonumber(a), tonumber(b), tonumber(c)
    if kind == "b" then a = a + amount else b = b - amount end
    -- `rest`: the budget stored beside the state, kept as it is.
    redis.call("HSET", KEYS[1], field, string.format("%.0f,%.0f,%.0f", a, b, c) .. rest)
    n = n + 1
  end
end
return {n}
