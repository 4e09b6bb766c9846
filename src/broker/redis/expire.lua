-- Cancel the queue's tasks that wait past their expiry (broker rule 16), oldest deadline
-- first, at most 1000 per call. `exp` holds every task given an expiry, by its deadline; an
-- entry is dropped once its time has come (a task that started meanwhile keeps running).
-- Returns the ids of the tasks cancelled.
local p = KEYS[1]
local now = clock()
local ids = redis.call('ZRANGEBYSCORE', p .. 'exp', '-inf', fmt(now), 'LIMIT', 0, 1000)
local out = {}
for _, id in ipairs(ids) do
  redis.call('ZREM', p .. 'exp', id)
  local t = p .. 't:' .. id
  local f = redis.call('HMGET', t, 'state', 'node', 'seq', 'rk', 'unique_key')
  local st = f[1]
  if st == 'scheduled' or st == 'retrying' or (st == 'queued' and not f[2]) then
    redis.call('ZREM', p .. 'ready', f[4])
    redis.call('ZREM', p .. 'waiting', id)
    redis.call('HSET', t, 'state', 'cancelled', 'finished_at', fmt(now), 'updated_at', fmt(now),
      'last_error', 'expired')
    redis.call('HDEL', t, 'blocked')
    move_state(p, id, st, 'cancelled', f[3], fmt(now))
    free_unique(p, id, f[5])
    settle(p, id, 'cancelled')
    out[#out + 1] = id
  end
end
return out
