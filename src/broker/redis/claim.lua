-- Promote due waiting tasks, then reserve up to `max` ready tasks for a node.
-- ARGV: node, max, lease (ms). Returns one HGETALL array per claimed task.
local p = KEYS[1]
local node, max, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('EXISTS', p .. 'paused') == 1 then return {} end
local now = clock()
local due = redis.call('ZRANGEBYSCORE', p .. 'waiting', '-inf', fmt(now), 'LIMIT', 0, 1000)
for _, id in ipairs(due) do
  local t = p .. 't:' .. id
  local f = redis.call('HMGET', t, 'state', 'seq', 'priority', 'rk')
  redis.call('ZREM', p .. 'waiting', id)
  if f[1] == 'scheduled' or f[1] == 'retrying' then
    move_state(p, id, f[1], 'queued', f[2])
    redis.call('HSET', t, 'state', 'queued', 'updated_at', fmt(now))
    ready_add(p, f[3], f[4])
  end
end
local out = {}
if max <= 0 then return out end
-- Store as many inbox tasks as this claim could take, so that it chooses among them too
-- (by priority, then age). Each push adds an entry for its time: 2 * max entries hold at
-- least max tasks.
store_inbox(p, 2 * max)
local expires = fmt(now + lease)
local members = redis.call('ZRANGE', p .. 'ready', 0, max - 1)
for _, m in ipairs(members) do
  local id = string.sub(m, 19)
  local t = p .. 't:' .. id
  redis.call('ZREM', p .. 'ready', m)
  redis.call('HINCRBY', t, 'token', 1)
  redis.call('HSET', t, 'node', node, 'expires', expires, 'updated_at', fmt(now))
  redis.call('HDEL', t, 'pid', 'pid_start', 'pid_boot')
  redis.call('ZADD', p .. 'held', expires, id)
  out[#out + 1] = redis.call('HGETALL', t)
end
return out
