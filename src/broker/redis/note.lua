-- Add a run to a task's history without changing the task: the record of a run whose node
-- had lost the lease (Broker::note_run). ARGV: id, attempt JSON. Returns 'ok' or 'missing'.
local p = KEYS[1]
local id = ARGV[1]
if redis.call('EXISTS', p .. 't:' .. id) == 0 then return 'missing' end
redis.call('RPUSH', p .. 'h:' .. id, ARGV[2])
return 'ok'
