-- Take back held tasks whose lease expired before now + delta (or all, when ARGV[1] is
-- '1'). ARGV: all, delta (ms), note, boot, max_lost, the `last_error` of a task lost more
-- than max_lost times (`{lost}` stands for the count). A running task gets a `lost`
-- attempt, uncharged; past max_lost lost attempts it ends `failed` (rule 17); a reserved
-- one goes back silently; a pending cancel ends either `cancelled`.
-- Returns id, node, pid, pid_start, failed ('1' or '0') per task ('' when unknown; a pid
-- from another boot is never returned).
local p = KEYS[1]
local all, delta, note, boot = ARGV[1] == '1', tonumber(ARGV[2]), ARGV[3], ARGV[4]
local max_lost, too_often = tonumber(ARGV[5]), ARGV[6]
local now = clock()
local ids
if all then
  ids = redis.call('ZRANGE', p .. 'held', 0, -1)
else
  ids = redis.call('ZRANGEBYSCORE', p .. 'held', '-inf', '(' .. fmt(now + delta))
end
local out = {}
for _, id in ipairs(ids) do
  local t = p .. 't:' .. id
  local f = redis.call('HMGET', t, 'state', 'node', 'pid', 'pid_start', 'pid_boot',
    'started_at', 'attempts', 'cancel_requested', 'seq', 'priority', 'rk', 'unique_key')
  redis.call('ZREM', p .. 'held', id)
  if f[1] == 'queued' or f[1] == 'running' then
    local started = f[1] == 'running'
    local pid, pid_start = false, false
    if f[5] == boot then pid, pid_start = f[3], f[4] end
    local attempts = tonumber(f[7])
    if started then
      local a = { number = attempts, node = f[2] or '', started_at = tonumber(f[6] or now),
        ended_at = now, reason = 'lost', error = note, stdout_tail = '', stderr_tail = '' }
      if pid then a.pid = tonumber(pid) end
      redis.call('RPUSH', p .. 'h:' .. id, cjson.encode(a))
      attempts = math.max(attempts - 1, 0)
    end
    local lost = 0
    if started and f[8] ~= '1' then
      for _, h in ipairs(redis.call('LRANGE', p .. 'h:' .. id, 0, -1)) do
        if cjson.decode(h).reason == 'lost' then lost = lost + 1 end
      end
    end
    local failed = lost > max_lost
    redis.call('HDEL', t, 'node', 'expires', 'pid', 'pid_start', 'pid_boot')
    if failed then
      local err = string.gsub(too_often, '{lost}', tostring(lost))
      redis.call('HSET', t, 'state', 'failed', 'finished_at', fmt(now), 'updated_at', fmt(now),
        'last_error', err, 'attempts', fmt(attempts))
      move_state(p, id, f[1], 'failed', f[9], fmt(now))
      free_unique(p, id, f[12])
      settle(p, id, 'failed')
    elseif f[8] == '1' then
      redis.call('HSET', t, 'state', 'cancelled', 'finished_at', fmt(now), 'updated_at', fmt(now),
        'last_error', 'cancelled by an operator', 'cancel_requested', '0', 'attempts', fmt(attempts))
      redis.call('SREM', p .. 'cancel', id)
      move_state(p, id, f[1], 'cancelled', f[9], fmt(now))
      free_unique(p, id, f[12])
      settle(p, id, 'cancelled')
    else
      redis.call('HSET', t, 'state', 'queued', 'updated_at', fmt(now), 'attempts', fmt(attempts))
      move_state(p, id, f[1], 'queued', f[9])
      ready_add(p, f[10], f[11])
    end
    for _, v in ipairs({ id, f[2] or '', pid or '', pid_start or '', failed and '1' or '0' }) do
      out[#out + 1] = v
    end
  end
end
if #out > 0 then redis.call('PUBLISH', 'taskd:wake', 'work') end
return out
