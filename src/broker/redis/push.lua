-- Push plain tasks into the queue's inbox, all or nothing (see inbox.lua): the fast path
-- of enqueue, a few list operations per task. KEYS: the queue's prefix, then each task's
-- key (`<prefix>t:<id>`). ARGV: each task's entry, `<id>\31<args JSON>\31<payload>`, in
-- the same order. Refuses the batch when one of the ids is already stored. Returns the
-- server's time in µs: when the tasks were pushed (their created_at).
local p = KEYS[1]
local n = #ARGV
for i = 2, n + 1, 1000 do
  local j = math.min(i + 999, n + 1)
  if redis.call('EXISTS', unpack(KEYS, i, j)) > 0 then
    for k = i, j do
      if redis.call('EXISTS', KEYS[k]) == 1 then
        return redis.error_reply('DUPLICATE a task with id ' .. string.sub(KEYS[k], #p + 3)
          .. ' already exists')
      end
    end
  end
end
local _, now_us = clock()
local now = fmt(now_us)
-- The time goes first, once for the batch.
redis.call('RPUSH', p .. 'in', '@' .. now)
for i = 1, n, 1000 do
  redis.call('RPUSH', p .. 'in', unpack(ARGV, i, math.min(i + 999, n)))
end
redis.call('INCRBY', p .. 'inn', n)
redis.call('PUBLISH', 'taskd:wake', 'work')
return now
