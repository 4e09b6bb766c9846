-- Extend leases. ARGV: lease (ms), then id, token, node per lease. Returns the ids whose
-- lease is no longer held.
local p = KEYS[1]
local now = clock()
local expires = fmt(now + tonumber(ARGV[1]))
local lost = {}
for i = 2, #ARGV, 3 do
  local id, token, node = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local t = p .. 't:' .. id
  local f = redis.call('HMGET', t, 'state', 'token', 'node')
  if f[2] == token and f[3] == node and (f[1] == 'queued' or f[1] == 'running') then
    redis.call('HSET', t, 'expires', expires)
    redis.call('ZADD', p .. 'held', expires, id)
  else
    lost[#lost + 1] = id
  end
end
return lost
