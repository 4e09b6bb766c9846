-- Helpers shared by every taskd script (prepended to each one).
-- KEYS[1] is always the queue's prefix, `taskd:{q:<queue>}:`; every key a script touches
-- starts with it, so on Redis Cluster one script stays in one hash slot.
-- Numbers are passed to Redis through fmt(): Lua would print a large one in exponent form.

local function fmt(n)
  return string.format('%.0f', n)
end

local function clock()
  local t = redis.call('TIME')
  local s, us = tonumber(t[1]), tonumber(t[2])
  return s * 1000 + math.floor(us / 1000), s * 1000000 + us
end

local FINISHED = { succeeded = true, failed = true, cancelled = true }

-- Move a task between the per-state indexes (`st:<state>`, scored by seq). A finished
-- task is also in `fin:<state>`, scored by its finish time `at` (ms, the `finished_at` the
-- script writes), which retention reads with ZRANGEBYSCORE (prune.lua).
local function move_state(p, id, from, to, seq, at)
  if from then
    redis.call('ZREM', p .. 'st:' .. from, id)
    if FINISHED[from] then redis.call('ZREM', p .. 'fin:' .. from, id) end
  end
  redis.call('ZADD', p .. 'st:' .. to, seq, id)
  if FINISHED[to] then
    redis.call('ZADD', p .. 'fin:' .. to, at or fmt((clock())), id)
  end
end

-- A finished task no longer holds its unique key.
local function free_unique(p, id, key)
  if key and redis.call('HGET', p .. 'u', key) == id then
    redis.call('HDEL', p .. 'u', key)
  end
end

local function ready_add(p, priority, rk)
  redis.call('ZADD', p .. 'ready', fmt(-tonumber(priority)), rk)
end
