-- Put a failed or cancelled task back in the queue with a fresh attempt budget. ARGV: id.
-- Returns 'ok', 'missing', 'state:<state>' or 'taken' (its unique key is held).
local p = KEYS[1]
local id = ARGV[1]
local t = p .. 't:' .. id
local f = redis.call('HMGET', t, 'state', 'seq', 'priority', 'rk', 'unique_key', 'expires_at')
if not f[1] then return 'missing' end
if f[1] ~= 'failed' and f[1] ~= 'cancelled' then return 'state:' .. f[1] end
if f[5] then
  local holder = redis.call('HGET', p .. 'u', f[5])
  if holder and holder ~= id then return 'taken' end
  redis.call('HSET', p .. 'u', f[5], id)
end
local now = fmt(clock())
redis.call('HSET', t, 'state', 'queued', 'attempts', '0', 'run_at', now, 'updated_at', now,
  'cancel_requested', '0')
redis.call('HDEL', t, 'finished_at', 'last_error')
move_state(p, id, f[1], 'queued', f[2])
ready_add(p, f[3], f[4])
-- Its expiry still holds (broker rule 16): `expire` dropped its entry when it was cancelled,
-- or it failed with one; a retried task past its deadline is cancelled again, never run.
if f[6] then redis.call('ZADD', p .. 'exp', f[6], id) end
redis.call('PUBLISH', 'taskd:wake', 'work')
return 'ok'
