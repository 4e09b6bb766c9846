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

-- The prefix of another queue's keys. Dependencies are the one link between queues: a
-- parent's dependants may be on other queues (docs/redis.md, "Dependencies").
local function qprefix(queue)
  return 'taskd:{q:' .. queue .. '}:'
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
    -- Scored by when retention may count from: the finish, or, for a task whose unique
    -- key holds past it (`unique_for`), the end of that hold. A parent with dependants
    -- not finished (`pin`) is left out until the last of them finishes.
    local f = redis.call('HMGET', p .. 't:' .. id, 'unique_for')
    if redis.call('HEXISTS', p .. 'pin', id) == 0 then
      local score = tonumber(at or fmt((clock()))) + tonumber(f[1] or '0')
      redis.call('ZADD', p .. 'fin:' .. to, fmt(score), id)
    end
    -- A dependant that finished no longer keeps its parents from retention (broker rule
    -- 18): `pin` counts each parent's dependants not finished yet; a parent whose count
    -- drops to zero is put back in its `fin:<state>` (prune.lua took it out).
    local aq = redis.call('HGET', p .. 't:' .. id, 'afterq')
    if aq then
      redis.call('HDEL', p .. 't:' .. id, 'afterq')
      for pq, pid in string.gmatch(aq, '([^,]-)\31([^,]+)') do
        local pp = qprefix(pq)
        if redis.call('HINCRBY', pp .. 'pin', pid, -1) <= 0 then
          redis.call('HDEL', pp .. 'pin', pid)
          local f = redis.call('HMGET', pp .. 't:' .. pid, 'state', 'finished_at', 'unique_for')
          if f[1] and FINISHED[f[1]] and f[2] then
            redis.call('ZADD', pp .. 'fin:' .. f[1], fmt(tonumber(f[2]) + tonumber(f[3] or '0')), pid)
          end
        end
      end
    end
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
        move_state(cp, cid, 'scheduled', 'cancelled', f[3], now)
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
