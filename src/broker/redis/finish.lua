-- Record attempts and move their tasks on, each only if its lease is still held: the
-- results a node has ready at once go in one call. ARGV: 9 per task: id, token, node, next
-- (succeeded|retry|failed|cancelled|requeue|release), retry_at, has_pid (0/1), attempt
-- JSON, error ('' = none, else 'e:' .. text), result ('' = none, else the JSON a succeeded
-- task returned, kept in 'r:' .. id). Returns per task 'ok', 'lost' or 'missing'.
local p = KEYS[1]
local now = clock()
local wake_work, wake_sched = false, false
local states = { succeeded = 'succeeded', retry = 'retrying', failed = 'failed',
  cancelled = 'cancelled', requeue = 'queued', release = 'queued' }

local function finish(id, token, node, nxt, retry_at, has_pid, attempt, failure, result)
  local t = p .. 't:' .. id
  local f = redis.call('HMGET', t, 'state', 'token', 'node', 'cancel_requested', 'seq',
    'priority', 'rk', 'unique_key', 'attempts')
  if not f[1] then return 'missing' end
  if f[2] ~= token or f[3] ~= node or (f[1] ~= 'queued' and f[1] ~= 'running') then
    return 'lost'
  end
  local counted = f[1] == 'running'
  local release = nxt == 'release'
  if not release then
    redis.call('RPUSH', p .. 'h:' .. id, attempt)
  end
  local cr = f[4] == '1'
  if cr and (nxt == 'retry' or nxt == 'requeue' or nxt == 'release') then nxt = 'cancelled' end
  local charged = true
  if nxt == 'requeue' or nxt == 'release' then
    charged = false
  elseif nxt == 'cancelled' then
    charged = has_pid == '1'
  end
  local attempts = tonumber(f[9])
  if charged and not counted then attempts = attempts + 1 end
  if counted and not charged then attempts = math.max(attempts - 1, 0) end
  local state = states[nxt]
  -- One HSET and one HDEL: every write a script makes is appended to the AOF.
  local set = { 'state', state, 'attempts', fmt(attempts), 'updated_at', fmt(now),
    'cancel_requested', '0' }
  local del = { 'node', 'expires', 'pid', 'pid_start', 'pid_boot' }
  if state == 'succeeded' and result ~= '' then
    redis.call('SET', p .. 'r:' .. id, result)
  end
  if state == 'succeeded' or state == 'failed' or state == 'cancelled' then
    set[#set + 1] = 'finished_at'
    set[#set + 1] = fmt(now)
    free_unique(p, id, f[8])
  else
    del[#del + 1] = 'finished_at'
  end
  if nxt ~= 'release' then
    local err = failure
    if nxt == 'succeeded' then
      err = ''
    elseif nxt == 'cancelled' and cr then
      err = 'e:cancelled by an operator'
    end
    if err == '' then
      del[#del + 1] = 'last_error'
    else
      set[#set + 1] = 'last_error'
      set[#set + 1] = string.sub(err, 3)
    end
  end
  redis.call('HSET', t, unpack(set))
  redis.call('HDEL', t, unpack(del))
  redis.call('ZREM', p .. 'held', id)
  -- Only a task with cancel_requested '1' is in the set (cancel.lua adds both together).
  if cr then redis.call('SREM', p .. 'cancel', id) end
  move_state(p, id, f[1], state, f[5], fmt(now))
  if state == 'queued' then
    ready_add(p, f[6], f[7])
    wake_work = true
  elseif state == 'retrying' then
    redis.call('HSET', t, 'run_at', retry_at)
    redis.call('ZADD', p .. 'waiting', retry_at, id)
    wake_sched = true
  else
    settle(p, id, state)
  end
  return 'ok'
end

local out = {}
for i = 1, #ARGV, 9 do
  out[#out + 1] = finish(ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4],
    ARGV[i + 5], ARGV[i + 6], ARGV[i + 7], ARGV[i + 8])
end
if wake_work then redis.call('PUBLISH', 'taskd:wake', 'work') end
if wake_sched then redis.call('PUBLISH', 'taskd:wake', 'sched') end
return out
