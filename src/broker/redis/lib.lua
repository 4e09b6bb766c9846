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

-- A finished task no longer holds its unique key, unless it was given `unique_for`: then
-- the key stays taken until that long after now (`uf`: key -> '<until ms>:<id>').
local function free_unique(p, id, key)
  if key and redis.call('HGET', p .. 'u', key) == id then
    redis.call('HDEL', p .. 'u', key)
    local hold = redis.call('HGET', p .. 't:' .. id, 'unique_for')
    if hold then
      redis.call('HSET', p .. 'uf', key, fmt(clock() + tonumber(hold)) .. ':' .. id)
    end
  end
end

-- The prefix of another queue's keys. Dependencies are the one link between queues: a
-- parent's dependants may be on other queues (docs/redis.md, "Dependencies").
local function qprefix(queue)
  return 'taskd:{q:' .. queue .. '}:'
end

-- Task `id` of prefix `p` ended in `state`: settle its dependants (broker rule 13), listed
-- in `kids:<id>` as '<queue>\31<id>'. A success counts each one's `blocked` down and puts
-- one with none left in its queue's `waiting` index (promoted by the next claim); a failure
-- or a cancel cancels them, and theirs after them.
local function settle(p, id, state)
  local kids = p .. 'kids:' .. id
  local members = redis.call('SMEMBERS', kids)
  if #members == 0 then return end
  redis.call('DEL', kids)
  local now = fmt(clock())
  local woke = false
  for _, m in ipairs(members) do
    local cq, cid = string.match(m, '^(.-)\31(.*)$')
    local cp = qprefix(cq)
    local ct = cp .. 't:' .. cid
    local f = redis.call('HMGET', ct, 'state', 'blocked', 'seq', 'run_at', 'unique_key')
    if f[1] == 'scheduled' and tonumber(f[2] or '0') > 0 then
      if state == 'succeeded' then
        if redis.call('HINCRBY', ct, 'blocked', -1) <= 0 then
          redis.call('HDEL', ct, 'blocked')
          redis.call('HSET', ct, 'updated_at', now)
          redis.call('ZADD', cp .. 'waiting', f[4], cid)
          woke = true
        end
      else
        redis.call('HSET', ct, 'state', 'cancelled', 'finished_at', now, 'updated_at', now,
          'last_error', 'dependency ' .. id .. ' failed')
        redis.call('HDEL', ct, 'blocked')
        move_state(cp, cid, 'scheduled', 'cancelled', f[3])
        free_unique(cp, cid, f[5])
        settle(cp, cid, 'cancelled')
      end
    end
  end
  if woke then redis.call('PUBLISH', 'taskd:wake', 'sched') end
end

local function ready_add(p, priority, rk)
  redis.call('ZADD', p .. 'ready', fmt(-tonumber(priority)), rk)
end
