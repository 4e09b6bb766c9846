-- Push plain tasks into the queue's inbox, all or nothing (see inbox.lua): the fast path
-- of enqueue, a few list operations per task. KEYS: the queue's prefix, then each task's
-- key (`<prefix>t:<id>`). ARGV: each task's entry, `<id>\31<args JSON>\31<payload>`, in
-- the same order. Refuses the batch when an entry is malformed or one of the ids is
-- already stored. Returns the server's time in µs: when the tasks were pushed (their
-- created_at).
local p = KEYS[1]
local n = #ARGV
if #KEYS ~= n + 1 then
  return redis.error_reply('ERR push needs one key per task after the prefix')
end
-- Only what storing needs is checked (no copies of the strings: this is the hot path); a
-- key naming another id would only weaken the duplicate check, which storing repeats.
for i = 1, n do
  local e = ARGV[i]
  local a = string.find(e, '\31', 1, true)
  if not a or a == 1 or string.byte(e, 1) == 64 or not string.find(e, '\31', a + 1, true) then
    return redis.error_reply('ERR push: task ' .. i .. ' is not <id>\\31<args>\\31<payload>')
  end
end
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
local now, now_us = clock()
-- The batch's place in the queue's order: n seq values of its own, after every one given.
local first = now_us
local last = tonumber(redis.call('GET', p .. 'seq') or '0')
if first <= last then first = last + 1 end
redis.call('SET', p .. 'seq', fmt(first + n - 1))
redis.call('RPUSH', p .. 'in', '@' .. fmt(first) .. ':' .. fmt(now))
for i = 1, n, 1000 do
  redis.call('RPUSH', p .. 'in', unpack(ARGV, i, math.min(i + 999, n)))
end
redis.call('INCRBY', p .. 'inn', n)
redis.call('PUBLISH', 'taskd:wake', 'work')
return fmt(now_us)
