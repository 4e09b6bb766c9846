-- Index the finished tasks of a store written before `fin:<state>` existed, in bounded
-- steps: up to 256 tasks of `st:<state>` (by seq, after the cursor kept in `finfill`) are
-- added to `fin:<state>` by their `finished_at`. ARGV: the states. Returns 1 once every
-- state is done (`finfill` then says `done` for each), else 0.
local p = KEYS[1]
local all = 1
for _, state in ipairs(ARGV) do
  local cursor = redis.call('HGET', p .. 'finfill', state)
  if cursor ~= 'done' then
    local from = '-inf'
    if cursor then from = '(' .. cursor end
    local rows = redis.call('ZRANGEBYSCORE', p .. 'st:' .. state, from, '+inf',
      'WITHSCORES', 'LIMIT', 0, 256)
    for j = 1, #rows, 2 do
      local id = rows[j]
      local f = redis.call('HMGET', p .. 't:' .. id, 'finished_at', 'unique_for')
      -- As move_state scores it; a parent still pinned by dependants stays out.
      if f[1] and redis.call('HEXISTS', p .. 'pin', id) == 0 then
        local score = tonumber(f[1]) + tonumber(f[2] or '0')
        redis.call('ZADD', p .. 'fin:' .. state, 'NX', string.format('%.0f', score), id)
      end
    end
    if #rows < 512 then
      redis.call('HSET', p .. 'finfill', state, 'done')
    else
      redis.call('HSET', p .. 'finfill', state, rows[#rows])
      all = 0
    end
  end
end
return all
