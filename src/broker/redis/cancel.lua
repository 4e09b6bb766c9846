-- Cancel a waiting task, or ask the node holding it to stop it. ARGV: id.
-- Returns 'cancelled', 'requested', 'finished:<state>' or 'missing'.
local p = KEYS[1]
local id = ARGV[1]
local t = p .. 't:' .. id
local f = redis.call('HMGET', t, 'state', 'node', 'seq', 'rk', 'unique_key')
if not f[1] then return 'missing' end
local now = fmt(clock())
local state = f[1]
if state == 'running' or (state == 'queued' and f[2]) then
  redis.call('HSET', t, 'cancel_requested', '1', 'updated_at', now)
  redis.call('SADD', p .. 'cancel', id)
  redis.call('PUBLISH', 'taskd:wake', 'cancel')
  return 'requested'
end
if state == 'succeeded' or state == 'failed' or state == 'cancelled' then
  return 'finished:' .. state
end
redis.call('ZREM', p .. 'ready', f[4])
redis.call('ZREM', p .. 'waiting', id)
redis.call('HSET', t, 'state', 'cancelled', 'finished_at', now, 'updated_at', now,
  'last_error', 'cancelled before it ran')
move_state(p, id, state, 'cancelled', f[3], now)
redis.call('HDEL', t, 'blocked')
free_unique(p, id, f[5])
settle(p, id, 'cancelled')
return 'cancelled'
