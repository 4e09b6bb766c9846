-- Mark held tasks a node's start log says were started as running. ARGV: ids.
-- Returns how many were marked.
local p = KEYS[1]
local now = fmt(clock())
local n = 0
for _, id in ipairs(ARGV) do
  local t = p .. 't:' .. id
  local f = redis.call('HMGET', t, 'state', 'node', 'seq')
  if f[1] == 'queued' and f[2] then
    redis.call('HINCRBY', t, 'attempts', 1)
    redis.call('HSET', t, 'state', 'running', 'started_at', now, 'updated_at', now)
    move_state(p, id, 'queued', 'running', f[3])
    n = n + 1
  end
end
return n
